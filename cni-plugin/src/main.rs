//! `ferrite`: the CNI plugin binary. Invoked by a runtime with CNI_COMMAND
//! set it speaks the CNI protocol (`cni.rs`); invoked by a person it offers
//! a few subcommands (`admin.rs`, `ferrite help`).
//!
//! The binary provides C's `main` itself (`#![no_main]`) instead of std's
//! start-up, which a process that lives for one ADD pays for on every pod:
//! std reads /proc/self/maps to find the main thread's stack and installs
//! SIGSEGV/SIGBUS handlers on an alternate signal stack (for its "stack
//! overflow" message), 17 system calls at start and 2 at exit of the 199 an
//! ADD made (docs/bench/syscalls.md). What of std's start-up matters is done
//! here: stdin, stdout and stderr are made sure to be open (so that a file
//! opened later can never become "stdout" and receive the result), SIGPIPE
//! is ignored and stdout is flushed at exit, as std does; a panic still
//! prints its message and exits 101. Without std's handler a stack overflow
//! ends the process with SIGSEGV instead of a message and SIGABRT: either
//! way the runtime sees the plugin fail.

// Unit tests get the test harness's own main.
#![cfg_attr(not(test), no_main)]

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
mod hostport;
mod logging;
mod naming;
mod netlink;
mod netns;
mod plugin;
mod policy_view;
mod repair;
mod result;
mod service_view;
mod version;
mod veth;

/// The process's entry, called by the C runtime. (glibc hands std the
/// arguments by itself, so `std::env::args_os` works as usual.)
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    startup();
    // The panic hook has printed the message; exit as std's runtime does.
    let code = std::panic::catch_unwind(run).map_or(101, libc::c_int::from);
    // std's runtime flushes stdout at exit; without it, a last line
    // without a newline would stay in the buffer.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

// Under test the harness's main runs instead: these stay, unused.
#[cfg_attr(test, allow(dead_code))]
fn run() -> u8 {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni::run();
    }
    // Only a person gets here: the admin command line (`admin.rs`).
    match admin::run(std::env::args_os().skip(1)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrite: {e:#}");
            1
        }
    }
}

/// What std's start-up does that this program relies on: descriptors 0, 1
/// and 2 open (on /dev/null if the caller closed one), SIGPIPE ignored
/// (a write to a closed pipe fails with EPIPE instead of killing us).
#[cfg_attr(test, allow(dead_code))]
fn startup() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: poll reads and writes the three pollfds passed.
    let polled = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } >= 0;
    for pfd in &fds {
        let closed = if polled {
            pfd.revents & libc::POLLNVAL != 0
        } else {
            // SAFETY: F_GETFD only asks whether the descriptor is open.
            let rc = unsafe { libc::fcntl(pfd.fd, libc::F_GETFD) };
            rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
        };
        // open returns the lowest free descriptor: the closed one.
        // SAFETY: a NUL-terminated path; the descriptor is meant to stay open.
        if closed && unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } != pfd.fd {
            std::process::abort();
        }
    }
    // SAFETY: installs SIG_IGN, which needs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}
