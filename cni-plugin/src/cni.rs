// SPDX-License-Identifier: Apache-2.0
//! The CNI entry: the runtime ran `ferrite` with CNI_COMMAND set. Reads the
//! environment and stdin, dispatches (`plugin.rs`) and writes the one
//! result or error JSON to stdout.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::io::{Read, Write};

use crate::error::{CniError, Code};
use crate::plugin;
use crate::version;

/// What stdin is first read into; a larger configuration grows it.
const STDIN_START: usize = 16 * 1024;

/// The CNI protocol: the only thing written to stdout is the result or the
/// error JSON.
pub fn run() -> u8 {
    // A fixed hasher: the runtime's own environment needs no protection
    // from collisions, and a random one costs a getrandom call.
    let env: HashMap<String, String, BuildHasherDefault<DefaultHasher>> =
        std::env::vars().collect();
    // Room for any network configuration in one read (the default start
    // of 32 bytes read it 32, 32, 64, 128... bytes at a time).
    let mut stdin = Vec::with_capacity(STDIN_START);
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = CniError::new(Code::Io, "cannot read stdin").with_details(e);
        return emit(&plugin::Output {
            stdout: Some(err.to_json(version::LATEST)),
            exit: 1,
        });
    }
    let out = plugin::dispatch(&env, &stdin, true);
    emit(&out)
}

fn emit(out: &plugin::Output) -> u8 {
    if let Some(v) = &out.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, v);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    out.exit
}
