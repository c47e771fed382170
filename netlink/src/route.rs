// SPDX-License-Identifier: Apache-2.0
//! NETLINK_ROUTE with netlink-packet-route's typed messages, and the small
//! conversions every rtnetlink user needs.

use std::net::IpAddr;

use netlink_packet_route::route::RouteAddress;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Netlink, Result, Socket, NETLINK_ROUTE};

/// An rtnetlink socket.
pub type RouteNetlink<T = Socket> = Netlink<RouteNetlinkMessage, T>;

/// An rtnetlink socket in the calling thread's network namespace.
pub fn open() -> Result<RouteNetlink> {
    Netlink::open(NETLINK_ROUTE)
}

/// An rtnetlink socket in the network namespace `netns`.
pub fn open_in_netns(netns: std::os::fd::BorrowedFd<'_>) -> Result<RouteNetlink> {
    Netlink::open_in_netns(NETLINK_ROUTE, netns)
}

/// The address family of `ip`.
pub fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// An RTA_DST or RTA_GATEWAY as an IP address (`None` for MPLS and
/// anything else that is not one).
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_and_route_ip() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(family(v4), AddressFamily::Inet);
        assert_eq!(family(v6), AddressFamily::Inet6);
        assert_eq!(route_ip(&RouteAddress::from(v4)), Some(v4));
        assert_eq!(route_ip(&RouteAddress::from(v6)), Some(v6));
        assert_eq!(route_ip(&RouteAddress::Other(vec![1, 2])), None);
    }
}
