//! ADD, DEL, CHECK, STATUS and GC, one file each, and what they share.

mod add;
mod check;
mod del;
mod gc;
mod status;

pub use add::add;
pub use check::check;
pub use del::del;
pub use gc::gc;
pub use status::status;

use std::net::IpAddr;

use crate::config::NetConf;
use crate::error::{CniError, CniResult, Code};
use crate::netlink::Netlink;
use crate::result::CniOutput;
use crate::veth;

fn datapath_error(msg: &str, e: &ferrite_datapath::DatapathError) -> CniError {
    CniError::from_error(Code::Datapath, msg, e)
}

fn host_netlink() -> CniResult<Netlink> {
    Netlink::new().map_err(|e| veth::kernel_error("cannot open a netlink socket", &e))
}

fn prev_result_ips(conf: &NetConf) -> Vec<IpAddr> {
    conf.prev_result
        .as_ref()
        .and_then(|v| CniOutput::from_json(v).ok())
        .map(|r| r.ips.iter().map(|i| i.address.ip()).collect())
        .unwrap_or_default()
}
