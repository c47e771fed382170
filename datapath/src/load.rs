//! Loading the embedded objects with aya and pinning what they contain.
//! Only the first caller on a node (per version) ever gets here.

use std::path::{Path, PathBuf};

use aya::{
    programs::{CgroupSockAddr, SchedClassifier},
    Ebpf, EbpfLoader,
};
use thiserror::Error;

/// The objects build.rs compiled, one per program, named like the program:
/// the pod programs, which the first ADD on a node loads (its cost is the
/// cold path's), then the uplink's, which only the node agent loads.
pub(crate) static OBJECTS: [(&str, &[u8]); 4] = [
    (
        crate::pin::FROM_POD,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_pod.o")),
    ),
    (
        crate::pin::TO_POD,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/to_pod.o")),
    ),
    (
        crate::pin::FROM_UPLINK,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_uplink.o")),
    ),
    (
        crate::pin::TO_UPLINK,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/to_uplink.o")),
    ),
];

/// The object with the programs for the node's own sockets (host_sock.c):
/// only the agent loads it, when kube-proxy does not run.
static HOST_SOCK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host_sock.o"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("loading object {object}.o (maps pinned in {pin_dir}): {source}")]
    Object {
        object: &'static str,
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("object {object}.o has no program {object}")]
    MissingProgram { object: &'static str },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("publishing {path}: {source}")]
    Publish {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning program {program} at {path}: {source}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
}

/// How many of [`OBJECTS`] the first ADD loads.
const POD_OBJECTS: usize = 2;

/// Loads the pod programs' objects, pinning their maps (by name, shared
/// between objects) and their programs into `dir`.
pub(crate) fn load_and_pin(dir: &Path, options: &crate::LoadOptions) -> Result<(), LoadError> {
    let mut loader = loader(dir, options);
    for (name, bytes) in &OBJECTS[..POD_OBJECTS] {
        load_one(&mut loader, dir, name, bytes, &dir.join(name))?;
    }
    Ok(())
}

/// Loads the uplink programs into the complete version directory `dir`
/// (their maps are already pinned there), each pinned under a work name
/// and renamed into place, so a pin that exists is whole. Two racing
/// loaders each publish a valid program; the later rename wins.
pub(crate) fn load_and_pin_uplink(dir: &Path) -> Result<(), LoadError> {
    let missing: Vec<_> = OBJECTS[POD_OBJECTS..]
        .iter()
        .filter(|(name, _)| !dir.join(name).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut loader = loader(dir, &crate::LoadOptions::default());
    for (name, bytes) in missing {
        let work = dir.join(format!("tmp-{name}-{}", std::process::id()));
        load_one(&mut loader, dir, name, bytes, &work)?;
        publish(&work, &dir.join(name))?;
    }
    Ok(())
}

/// Renames a pin made under a work name into place: a pin that exists is
/// whole.
fn publish(work: &Path, path: &Path) -> Result<(), LoadError> {
    std::fs::rename(work, path).map_err(|source| LoadError::Publish {
        path: path.to_owned(),
        source,
    })
}

/// Loads the host socket programs ([`crate::host_sock::PROGRAMS`]) into the
/// complete version directory `dir`, each pinned under a work name and
/// renamed into place, like the uplink's.
pub(crate) fn load_and_pin_host_sock(dir: &Path) -> Result<(), LoadError> {
    let programs = crate::host_sock::PROGRAMS;
    if programs.iter().all(|p| dir.join(p.name).exists()) {
        return Ok(());
    }
    let object = "host_sock";
    let mut ebpf = load_object(
        &mut loader(dir, &crate::LoadOptions::default()),
        dir,
        object,
        HOST_SOCK_OBJECT,
    )?;
    for p in programs {
        let path = dir.join(p.name);
        if path.exists() {
            continue;
        }
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(p.name)
            .ok_or(LoadError::MissingProgram { object })?
            .try_into()
            .map_err(|source| LoadError::Program {
                program: p.name,
                source: Box::new(source),
            })?;
        program.load().map_err(|source| LoadError::Program {
            program: p.name,
            source: Box::new(source),
        })?;
        let work = dir.join(format!("tmp-{}-{}", p.name, std::process::id()));
        program.pin(&work).map_err(|source| LoadError::Pin {
            program: p.name,
            path: work.clone(),
            source: Box::new(source),
        })?;
        publish(&work, &path)?;
    }
    Ok(())
}

/// A loader that pins maps by name in `dir`, the state maps in the shared
/// state directory. Make one per load and give it every object: aya's
/// `EbpfLoader::new` parses /sys/kernel/btf/vmlinux (30–55 ms here) each
/// time, though ferrite, without CO-RE relocations, then tells it to use
/// none.
fn loader<'a>(dir: &Path, options: &crate::LoadOptions) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.btf(None).default_map_pin_directory(dir);
    if let Some(n) = options.conntrack_entries {
        loader.map_max_entries("ferrite_ct", n);
    }
    if let Some(n) = options.service_conntrack_entries {
        loader.map_max_entries("ferrite_svcct", n);
        loader.map_max_entries("ferrite_svcrev", n);
    }
    // The state maps: an earlier version's are reused as they are.
    for m in crate::pin::STATE_MAPS {
        loader.map_pin_path(m, crate::pin::map_path(dir, m));
    }
    loader
}

/// Loads object `name` with `loader` (see [`loader`]).
fn load_object(
    loader: &mut EbpfLoader<'_>,
    dir: &Path,
    name: &'static str,
    bytes: &[u8],
) -> Result<Ebpf, LoadError> {
    loader.load(bytes).map_err(|source| LoadError::Object {
        object: name,
        pin_dir: dir.to_owned(),
        source: Box::new(source),
    })
}

fn load_one(
    loader: &mut EbpfLoader<'_>,
    dir: &Path,
    name: &'static str,
    bytes: &[u8],
    pin: &Path,
) -> Result<(), LoadError> {
    let mut ebpf = load_object(loader, dir, name, bytes)?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { object: name })?
        .try_into()
        .map_err(|source| LoadError::Program {
            program: name,
            source: Box::new(source),
        })?;
    program.load().map_err(|source| LoadError::Program {
        program: name,
        source: Box::new(source),
    })?;
    program.pin(pin).map_err(|source| LoadError::Pin {
        program: name,
        path: pin.to_owned(),
        source: Box::new(source),
    })?;
    // Dropping `ebpf` closes our fds; the pins keep programs and maps.
    Ok(())
}
