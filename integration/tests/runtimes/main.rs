//! ferrite driven by real container runtimes installed from Debian:
//! containerd's CRI plugin (the kubelet path) and podman's CNI backend.
//! Each test skips with a reason when not root, and fails instead under
//! CI=true; the tests run one at a time (see `harness::serial`).

mod containerd;
mod cri;
mod harness;
mod podman;
