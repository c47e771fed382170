//! Addresses for a pod: the built-in allocator, or a delegated IPAM plugin
//! found in CNI_PATH, as the reference bridge plugin does it.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use ferrite_ipam::{Owner, Store};

use crate::config::{CniEnv, Ipam, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::result::CniOutput;

pub fn owner(env: &CniEnv) -> Owner {
    Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

pub fn open_store(conf: &NetConf) -> CniResult<Store> {
    Store::open(&conf.state_dir, &conf.name).map_err(|e| store_error(&conf.state_dir, &e))
}

pub fn store_error(dir: &std::path::Path, e: &dyn std::error::Error) -> CniError {
    CniError::from_error(
        Code::Io,
        format!("IPAM store under {} failed", dir.display()),
        e,
    )
}

pub fn ipam_error(e: ferrite_ipam::IpamError) -> CniError {
    use ferrite_ipam::IpamError as E;
    let code = match &e {
        E::Exhausted { .. } => Code::RangeExhausted,
        E::RequestedUnavailable { .. } | E::RequestedOutOfRange { .. } => Code::AddressUnavailable,
        _ => Code::InvalidConfig,
    };
    CniError::new(code, e.to_string())
}

/// Every statically requested address: CNI_ARGS `IP=`, the `ips`
/// capability, and `args.cni.ips`.
pub fn requested(conf: &NetConf, env: &CniEnv) -> CniResult<Vec<IpAddr>> {
    let mut out = env.args.ips.clone();
    for s in conf.runtime_config.ips.iter().chain(&conf.args_ips) {
        let plain = s.split('/').next().unwrap_or(s);
        let ip: IpAddr = plain.parse().map_err(|_| {
            CniError::new(
                Code::InvalidConfig,
                format!("requested address {s:?} is not an IP"),
            )
        })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Addresses for the pod, in range-set order. Built in: durable in the
/// store before this returns.
/// `pool` is the built-in pool ADD already validated (None when delegated).
pub fn allocate(
    conf: &NetConf,
    env: &CniEnv,
    pool: Option<&ferrite_ipam::Pool>,
) -> CniResult<Vec<IpAddr>> {
    match (&conf.ipam, pool) {
        (Ipam::Builtin { .. }, Some(pool)) => {
            let requested = requested(conf, env)?;
            let store = open_store(conf)?;
            let mut locked = store.lock().map_err(|e| store_error(&conf.state_dir, &e))?;
            let allocs = locked
                .state()
                .allocate(pool, &owner(env), &requested)
                .map_err(ipam_error)?;
            locked
                .commit()
                .map_err(|e| store_error(&conf.state_dir, &e))?;
            Ok(allocs.iter().map(|a| a.address.ip()).collect())
        }
        (Ipam::Builtin { .. }, None) => Err(CniError::new(
            Code::InvalidConfig,
            "built-in IPAM without a validated pool",
        )),
        (Ipam::Delegated { plugin }, _) => {
            let out = delegate(conf, env, plugin, "ADD")?;
            let value: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
                CniError::new(
                    Code::Delegate,
                    format!("IPAM plugin {plugin} returned invalid JSON"),
                )
                .with_details(e)
            })?;
            let result = CniOutput::from_json(&value)?;
            if result.ips.is_empty() {
                return Err(CniError::new(
                    Code::Delegate,
                    format!("IPAM plugin {plugin} returned no address"),
                ));
            }
            Ok(result.ips.iter().map(|ip| ip.address.ip()).collect())
        }
    }
}

/// Releases the pod's addresses; releasing nothing is fine.
pub fn release(conf: &NetConf, env: &CniEnv) -> CniResult<Vec<IpAddr>> {
    match &conf.ipam {
        Ipam::Builtin { .. } => {
            let store = open_store(conf)?;
            let mut locked = store.lock().map_err(|e| store_error(&conf.state_dir, &e))?;
            let released = locked.state().release(&owner(env));
            locked
                .commit()
                .map_err(|e| store_error(&conf.state_dir, &e))?;
            Ok(released)
        }
        Ipam::Delegated { plugin } => {
            delegate(conf, env, plugin, "DEL")?;
            Ok(Vec::new())
        }
    }
}

/// The addresses the store holds for this pod (built-in IPAM only).
pub fn held(conf: &NetConf, env: &CniEnv) -> CniResult<Vec<IpAddr>> {
    match &conf.ipam {
        Ipam::Builtin { .. } => {
            let store = open_store(conf)?;
            let state = store.read().map_err(|e| store_error(&conf.state_dir, &e))?;
            Ok(state.owned_by(&owner(env)))
        }
        Ipam::Delegated { .. } => Ok(Vec::new()),
    }
}

fn find_plugin(env: &CniEnv, plugin: &str) -> CniResult<PathBuf> {
    env.path
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                Code::Delegate,
                format!("IPAM plugin {plugin:?} not found in CNI_PATH"),
            )
            .with_details(format!("searched {:?}", env.path))
        })
}

/// Runs a delegated IPAM plugin with our environment and configuration.
fn delegate(conf: &NetConf, env: &CniEnv, plugin: &str, command: &str) -> CniResult<Vec<u8>> {
    let path = find_plugin(env, plugin)?;
    let mut child = Process::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(
                Code::Delegate,
                format!("cannot run IPAM plugin {}", path.display()),
            )
            .with_details(e)
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&conf.raw);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(Code::Delegate, format!("IPAM plugin {plugin} failed")).with_details(e)
    })?;
    if !out.status.success() {
        // Pass the delegate's own CNI error through when it gave one.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let msg = v.get("msg").and_then(|m| m.as_str()).unwrap_or("failed");
            return Err(
                CniError::new(Code::Delegate, format!("IPAM plugin {plugin}: {msg}"))
                    .with_details(v.get("details").and_then(|d| d.as_str()).unwrap_or("")),
            );
        }
        return Err(CniError::new(
            Code::Delegate,
            format!("IPAM plugin {plugin} exited with {}", out.status),
        ));
    }
    Ok(out.stdout)
}
