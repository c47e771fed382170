//! containerd with its CRI plugin, on a private socket, root and state
//! directory, started in a ferrite network's node namespace; and a CRI
//! client that speaks to it over gRPC exactly as kubelet does.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, ListPodSandboxRequest, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxStatusRequest, PortMapping, RemovePodSandboxRequest, RunPodSandboxRequest,
    StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::harness::{
    alive, docker_archive, kill, pids_mentioning, sh, unique, wait_for, CgroupParent, HostDirs,
    Network, TempDir,
};

pub const SANDBOX_IMAGE: &str = "ferrite.test/pause:1";
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod sandbox as PodSandboxStatus reports it.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    pub ip: IpAddr,
    /// The pod's network namespace, from the verbose status's runtime spec.
    pub netns: PathBuf,
    /// containerd's verbose info (runtime spec, CNI result, ...).
    pub info: Value,
}

/// What a pod asks for beyond its name.
#[derive(Default, Clone)]
pub struct PodSpec {
    pub port_mappings: Vec<PortMapping>,
    pub annotations: HashMap<String, String>,
}

pub struct Containerd<'a> {
    pub net: &'a Network,
    pub dir: TempDir,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    cgroup: CgroupParent,
    // Last: the hard-coded host directories go once everything else is gone.
    _host: HostDirs,
}

impl<'a> Containerd<'a> {
    /// Writes the config, starts containerd in the network's node namespace
    /// and imports the locally built sandbox image. The network's conf
    /// directory must already hold the conflist.
    pub fn start(net: &'a Network) -> Result<Self> {
        let host = HostDirs::guard();
        let dir = TempDir::new("ctd")?;
        let d = dir.path().display().to_string();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "runc"
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            bin = net.bin_dir().display(),
            conf = net.conf_dir().display(),
        );
        std::fs::write(dir.path().join("config.toml"), config)?;
        let image = docker_archive(
            &dir.path().join("image"),
            SANDBOX_IMAGE,
            &["/bin/sleep", "2147483647"],
        )?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut c = Self {
            net,
            dir,
            child: None,
            rt,
            client: None,
            cgroup: CgroupParent::new(),
            _host: host,
        };
        c.launch()?;
        sh(&format!(
            "ctr --address {} -n k8s.io images import {}",
            c.socket().display(),
            image.display()
        ))?;
        Ok(c)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    fn launch(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("containerd.log"))?;
        let _ = std::fs::remove_file(self.socket());
        // nsenter execs containerd: the child is containerd itself.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.net.node.path().display()))
            .arg("containerd")
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.child = Some(child);
        let socket = self.socket();
        wait_for(Duration::from_secs(20), || socket.exists().then_some(()))
            .ok_or_else(|| anyhow!("containerd did not open its socket: {}", self.log()))?;
        let channel = self.rt.block_on(async {
            Endpoint::try_from("http://[::]:50051")?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
        })?;
        self.client = Some(RuntimeServiceClient::new(channel));
        // Kubelet waits for the runtime to say its network is ready.
        let ready = wait_for(Duration::from_secs(20), || {
            let status =
                self.call(|mut c| async move { c.status(StatusRequest { verbose: false }).await });
            let conditions = status.ok()?.status?.conditions;
            conditions.iter().all(|c| c.status).then_some(())
        });
        ready.ok_or_else(|| anyhow!("containerd's CRI never became ready: {}", self.log()))?;
        let v = self.call(|mut c| async move {
            c.version(VersionRequest {
                version: "v1".into(),
            })
            .await
        })?;
        eprintln!(
            "containerd up: {} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 10 s; the shims and pods keep running.
    pub fn stop_daemon(&mut self) {
        self.client = None;
        if let Some(mut child) = self.child.take() {
            kill(child.id() as i32, libc::SIGTERM);
            let pid = child.id() as i32;
            let exited = wait_for(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().map(|_| ())
            });
            if exited.is_none() {
                kill(pid, libc::SIGKILL);
                let _ = child.wait();
            }
        }
    }

    /// Stops containerd and starts it again on the same root and state.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon();
        self.launch()
    }

    fn call<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone().context("containerd is not running")?;
        let resp = self
            .rt
            .block_on(async move { tokio::time::timeout(CALL_TIMEOUT, f(client)).await })
            .map_err(|_| anyhow!("CRI call timed out"))?
            .map_err(|s| anyhow!("CRI: {:?}: {}", s.code(), s.message()))?;
        Ok(resp.into_inner())
    }

    fn sandbox_config(&self, name: &str, spec: &PodSpec) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: unique("uid"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            port_mappings: spec.port_mappings.clone(),
            annotations: spec.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup.path.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox, then PodSandboxStatus.
    pub fn run_pod(&self, name: &str, spec: &PodSpec) -> Result<Sandbox> {
        let config = self.sandbox_config(name, spec);
        let id = self
            .call(|mut c| async move {
                c.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                })
                .await
            })
            .with_context(|| format!("RunPodSandbox {name}"))?
            .pod_sandbox_id;
        self.status(&id)
    }

    /// `n` pods started concurrently, as kubelet's pod workers do.
    pub fn run_pods(&self, prefix: &str, n: usize) -> Result<Vec<String>> {
        let client = self.client.clone().context("containerd is not running")?;
        self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..n {
                let mut c = client.clone();
                let config = self.sandbox_config(&format!("{prefix}-{i}"), &PodSpec::default());
                set.spawn(async move {
                    tokio::time::timeout(
                        CALL_TIMEOUT,
                        c.run_pod_sandbox(RunPodSandboxRequest {
                            config: Some(config),
                            runtime_handler: String::new(),
                        }),
                    )
                    .await
                });
            }
            let mut ids = vec![];
            let mut errors = vec![];
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(Ok(resp))) => ids.push(resp.into_inner().pod_sandbox_id),
                    Ok(Ok(Err(s))) => errors.push(format!("{:?}: {}", s.code(), s.message())),
                    Ok(Err(_)) => errors.push("timed out".into()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if !errors.is_empty() {
                // Still hand back what started, for the caller to remove.
                bail!("RunPodSandbox failed: {errors:?} (started: {ids:?})");
            }
            Ok(ids)
        })
    }

    pub fn status(&self, id: &str) -> Result<Sandbox> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        };
        let resp = self
            .call(|mut c| async move { c.pod_sandbox_status(req).await })
            .with_context(|| format!("PodSandboxStatus {id}"))?;
        let ip = resp
            .status
            .as_ref()
            .and_then(|s| s.network.as_ref())
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let ip: IpAddr = ip
            .parse()
            .with_context(|| format!("pod {id} has no IP in its status: {ip:?}"))?;
        let info: Value = resp
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(Value::Null);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("pod {id}: no network namespace in {info}"))?;
        Ok(Sandbox {
            id: id.to_string(),
            ip,
            netns,
            info,
        })
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does for a deleted pod.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let pod_sandbox_id = id.to_string();
        self.call(|mut c| async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("StopPodSandbox {id}"))?;
        let pod_sandbox_id = id.to_string();
        self.call(|mut c| async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        Ok(())
    }

    /// Stop and Remove for many pods at once.
    pub fn remove_pods(&self, ids: &[String]) -> Result<()> {
        let client = self.client.clone().context("containerd is not running")?;
        self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for id in ids {
                let mut c = client.clone();
                let id = id.clone();
                set.spawn(async move {
                    let stop = c
                        .stop_pod_sandbox(StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        })
                        .await;
                    let remove = c
                        .remove_pod_sandbox(RemovePodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        })
                        .await;
                    stop.and(remove)
                        .map_err(|s| format!("{id}: {:?}: {}", s.code(), s.message()))
                });
            }
            let mut errors = vec![];
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => errors.push(e),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                bail!("Stop/Remove failed: {errors:?}")
            }
        })
    }

    pub fn list_pods(&self) -> Result<Vec<String>> {
        let resp = self.call(|mut c| async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
        })?;
        Ok(resp.items.into_iter().map(|p| p.id).collect())
    }

    /// Kills shims and containers that outlived containerd (only ours: they
    /// name our private socket or runc root).
    fn reap(&self) {
        let d = self.dir.path().display().to_string();
        for pid in pids_mentioning(&d) {
            kill(pid, libc::SIGKILL);
        }
        let runc_root = self.dir.path().join("runc");
        for ns in read_dir_names(&runc_root) {
            let root = runc_root.join(&ns);
            for id in read_dir_names(&root) {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", &id])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = wait_for(Duration::from_secs(5), || {
            pids_mentioning(&d)
                .into_iter()
                .all(|p| !alive(p))
                .then_some(())
        });
    }
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        if self.client.is_some() {
            if let Ok(ids) = self.list_pods() {
                let _ = self.remove_pods(&ids);
            }
        }
        self.stop_daemon();
        self.reap();
        // Then `dir` unmounts what is left (rootfs, shm, netns) and goes,
        // and `_host` removes the hard-coded host directories we created.
    }
}
