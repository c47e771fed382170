//! Loading the embedded objects with aya and pinning what they contain.
//! Only the first caller on a node (per version) ever gets here.

use std::path::{Path, PathBuf};

use aya::{programs::SchedClassifier, EbpfLoader};
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
    for (name, bytes) in &OBJECTS[..POD_OBJECTS] {
        load_one(dir, name, bytes, &dir.join(name), options)?;
    }
    Ok(())
}

/// Loads the uplink programs into the complete version directory `dir`
/// (their maps are already pinned there), each pinned under a work name
/// and renamed into place, so a pin that exists is whole. Two racing
/// loaders each publish a valid program; the later rename wins.
pub(crate) fn load_and_pin_uplink(dir: &Path) -> Result<(), LoadError> {
    for (name, bytes) in &OBJECTS[POD_OBJECTS..] {
        let path = dir.join(name);
        if path.exists() {
            continue;
        }
        let work = dir.join(format!("tmp-{name}-{}", std::process::id()));
        load_one(dir, name, bytes, &work, &crate::LoadOptions::default())?;
        std::fs::rename(&work, &path).map_err(|source| LoadError::Publish {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn load_one(
    dir: &Path,
    name: &'static str,
    bytes: &[u8],
    pin: &Path,
    options: &crate::LoadOptions,
) -> Result<(), LoadError> {
    let state: Vec<PathBuf> = crate::pin::STATE_MAPS
        .iter()
        .map(|m| crate::pin::map_path(dir, m))
        .collect();
    let mut loader = EbpfLoader::new();
    // Never parse /sys/kernel/btf/vmlinux: ferrite has no CO-RE relocations.
    loader.btf(None).default_map_pin_directory(dir);
    if let Some(n) = options.conntrack_entries {
        loader.map_max_entries("ferrite_ct", n);
    }
    if let Some(n) = options.service_conntrack_entries {
        loader.map_max_entries("ferrite_svcct", n);
        loader.map_max_entries("ferrite_svcrev", n);
    }
    // The state maps: an earlier version's are reused as they are.
    for (m, path) in crate::pin::STATE_MAPS.iter().zip(&state) {
        loader.map_pin_path(m, path.as_path());
    }
    let mut ebpf = loader.load(bytes).map_err(|source| LoadError::Object {
        object: name,
        pin_dir: dir.to_owned(),
        source: Box::new(source),
    })?;
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
