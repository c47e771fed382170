//! Loading the embedded objects with aya and pinning what they contain.
//! Only the first caller on a node (per version) ever gets here.

use std::path::{Path, PathBuf};

use aya::{programs::SchedClassifier, EbpfLoader};
use thiserror::Error;

/// The objects build.rs compiled, one per program, named like the program.
pub(crate) static OBJECTS: [(&str, &[u8]); 2] = [
    (
        crate::pin::FROM_POD,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/from_pod.o")),
    ),
    (
        crate::pin::TO_POD,
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/to_pod.o")),
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
    #[error("pinning program {program} at {path}: {source}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
}

/// Loads every object, pinning its maps (by name, shared between objects)
/// and its program into `dir`.
pub(crate) fn load_and_pin(dir: &Path) -> Result<(), LoadError> {
    for (name, bytes) in OBJECTS {
        let mut ebpf = EbpfLoader::new()
            // Never parse /sys/kernel/btf/vmlinux: ferrite has no CO-RE relocations.
            .btf(None)
            .default_map_pin_directory(dir)
            .load(bytes)
            .map_err(|source| LoadError::Object {
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
        let path = dir.join(name);
        program.pin(&path).map_err(|source| LoadError::Pin {
            program: name,
            path,
            source: Box::new(source),
        })?;
        // Dropping `ebpf` closes our fds; the pins keep programs and maps.
    }
    Ok(())
}
