//! `ferrite`: the CNI plugin binary. Invoked by a runtime with CNI_COMMAND
//! set it speaks the CNI protocol (`cni.rs`); invoked by a person it offers
//! a few subcommands (`admin.rs`, `ferrite help`).

mod addresses;
mod admin;
mod bandwidth;
mod cni;
mod commands;
mod config;
mod error;
mod failpoint;
#[cfg(test)]
mod fuzz;
mod logging;
mod naming;
mod netlink;
mod plugin;
mod policy_view;
mod repair;
mod result;
mod service_view;
mod version;
mod veth;

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni::run();
    }
    // Only a person gets here: the admin command line (`admin.rs`).
    match admin::run(std::env::args_os().skip(1)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrite: {e:#}");
            ExitCode::from(1)
        }
    }
}
