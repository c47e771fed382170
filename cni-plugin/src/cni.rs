// SPDX-License-Identifier: Apache-2.0
//! The CNI entry: the runtime ran `ferrite` with CNI_COMMAND set. Reads the
//! environment and stdin, dispatches (`plugin.rs`) and writes the one
//! result or error JSON to stdout.

use std::collections::HashMap;
use std::io::{Read, Write};

use crate::error::{CniError, Code};
use crate::plugin;
use crate::version;

/// The CNI protocol: the only thing written to stdout is the result or the
/// error JSON.
pub fn run() -> u8 {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
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
