// SPDX-License-Identifier: Apache-2.0
//! ferrite's built-in IPAM: host-local style ranges ([`Pool`]), an
//! allocator over them ([`State`]) and a crash-safe on-disk store with a
//! flock held across search and reserve ([`Store`]).
//!
//! ```no_run
//! # use ferrite_ipam::*;
//! # fn add(ranges: &[Vec<RangeConfig>], owner: &Owner) -> Result<Vec<Allocation>, Error> {
//! let pool = Pool::from_config(ranges)?;
//! let store = Store::open(std::path::Path::new("/var/lib/cni/ferrite"), "k8s-pod-network")?;
//! let mut locked = store.lock()?;
//! let allocations = locked.state().allocate(&pool, owner, &[])?;
//! locked.commit()?; // durable before the addresses are used
//! # Ok(allocations)
//! # }
//! ```

mod range;
mod records;
mod state;
mod store;

pub use range::{Pool, Range, RangeConfig, RangeError, RangeSet};
pub use state::{Allocation, IpamError, Owner, State, MAX_CONTAINER_ID, MAX_IFNAME};
pub use store::{decode, encode, Locked, Store, StoreError};

/// Any IPAM failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
