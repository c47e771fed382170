// SPDX-License-Identifier: Apache-2.0
//! The one error of every netlink request ferrite makes.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Opening or setting up the socket failed.
    #[error("netlink socket: {call}: {source}")]
    Socket {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// Sending the request or receiving its answer failed (a receive
    /// timeout is EAGAIN).
    #[error("netlink {request}: {source}")]
    Io {
        request: String,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the request.
    #[error("netlink {request}: {source}{}", extack.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        request: String,
        #[source]
        source: io::Error,
        /// The kernel's extended ack message, when it gave one.
        extack: Option<String>,
    },
    /// The answer could not be read.
    #[error("netlink {request}: cannot decode reply: {detail}")]
    Decode { request: String, detail: String },
}

impl NetlinkError {
    /// The errno the kernel answered with, if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The kernel's extended ack message, if it refused with one.
    pub fn extack(&self) -> Option<&str> {
        match self {
            Self::Kernel { extack, .. } => extack.as_deref(),
            _ => None,
        }
    }

    /// A refusal with `errno` (positive) for `request`.
    pub fn kernel(request: impl Into<String>, errno: i32, extack: Option<String>) -> Self {
        Self::Kernel {
            request: request.into(),
            source: io::Error::from_raw_os_error(errno),
            extack,
        }
    }

    /// An answer that could not be read, or not the one expected.
    pub fn decode(request: impl Into<String>, detail: impl ToString) -> Self {
        Self::Decode {
            request: request.into(),
            detail: detail.to_string(),
        }
    }
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;
