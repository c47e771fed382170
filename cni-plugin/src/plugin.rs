//! The CNI protocol: environment and stdin in, one JSON document out.
//! `dispatch` takes both injected, so tests drive it without a process.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::{self, CniEnv, Command, NetConf};
use crate::error::{CniError, CniResult, Code};
use crate::version::{self, Version};
use crate::{commands, logging};

/// What the process prints on stdout and how it exits.
#[derive(Debug, PartialEq)]
pub struct Output {
    pub stdout: Option<Value>,
    pub exit: u8,
}

impl Output {
    fn ok(v: Option<Value>) -> Self {
        Self { stdout: v, exit: 0 }
    }

    fn err(e: &CniError, cni_version: &str) -> Self {
        Self {
            stdout: Some(e.to_json(cni_version)),
            exit: 1,
        }
    }
}

/// Runs one CNI invocation. `init_logging` is false in unit tests.
pub fn dispatch<S: BuildHasher>(
    env: &HashMap<String, String, S>,
    stdin: &[u8],
    init_logging: bool,
) -> Output {
    let reply_version = config::sniff_version(stdin);
    let command = match config::parse_command(env.get("CNI_COMMAND").map(String::as_str)) {
        Ok(c) => c,
        Err(e) => return Output::err(&e, &reply_version),
    };
    if command == Command::Version {
        return Output::ok(Some(json!({
            "cniVersion": reply_version,
            "supportedVersions": version::SUPPORTED,
        })));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Output::err(&e, &reply_version),
    };
    let env = match CniEnv::from_map(env) {
        Ok(e) => e,
        Err(e) => return Output::err(&e, &conf.cni_version),
    };
    if init_logging {
        logging::init(
            conf.log_file.as_deref(),
            conf.log_level,
            format!(
                "{} net={} cid={} if={}",
                format!("{:?}", env.command).to_uppercase(),
                conf.name,
                env.container_id,
                env.ifname
            ),
        );
    }
    let started = Instant::now();
    let result = run(&conf, &env);
    let took = started.elapsed();
    match result {
        Ok(v) => {
            log::info!("ok in {:.3} ms", took.as_secs_f64() * 1e3);
            Output::ok(v)
        }
        Err(e) => {
            log::error!("{e}");
            Output::err(&e, &conf.cni_version)
        }
    }
}

fn run(conf: &NetConf, env: &CniEnv) -> CniResult<Option<Value>> {
    let v = Version::parse(&conf.cni_version).unwrap_or(Version(1, 1, 0));
    match env.command {
        Command::Add => commands::add(conf, env).map(|out| Some(out.to_json(&conf.cni_version))),
        Command::Del => commands::del(conf, env).map(|()| None),
        Command::Check => {
            if !v.has_check() {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!(
                        "CHECK needs cniVersion 0.4.0 or later, got {}",
                        conf.cni_version
                    ),
                ));
            }
            commands::check(conf, env).map(|()| None)
        }
        Command::Status => {
            if !v.has_status_gc() {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!("STATUS needs cniVersion 1.1.0, got {}", conf.cni_version),
                ));
            }
            commands::status(conf).map(|()| None)
        }
        Command::Gc => {
            if !v.has_status_gc() {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!("GC needs cniVersion 1.1.0, got {}", conf.cni_version),
                ));
            }
            commands::gc(conf).map(|()| None)
        }
        Command::Version => unreachable!("handled before the configuration is read"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn version_answers_without_config() {
        let out = dispatch(&env(&[("CNI_COMMAND", "VERSION")]), b"", false);
        assert_eq!(out.exit, 0);
        let v = out.stdout.unwrap();
        assert_eq!(v["cniVersion"], version::LATEST);
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let out = dispatch(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.4.0"}"#,
            false,
        );
        assert_eq!(out.stdout.unwrap()["cniVersion"], "0.4.0");
    }

    #[test]
    fn errors_are_json_with_codes_and_nonzero_exit() {
        let conf = br#"{"cniVersion":"0.4.0","name":"n","type":"ferrite","ipam":{"subnet":"10.9.0.0/24"}}"#;
        // (environment, stdin, expected code)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [u8], u32);
        let cases: &[Case] = &[
            (&[], conf, 4),
            (&[("CNI_COMMAND", "ADD")], b"{", 6),
            (
                &[("CNI_COMMAND", "ADD")],
                br#"{"cniVersion":"9.0.0","name":"n","ipam":{}}"#,
                1,
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "../x"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                ],
                conf,
                4,
            ),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "abc"),
                    ("CNI_IFNAME", "eth0"),
                ],
                conf,
                4,
            ),
            (&[("CNI_COMMAND", "STATUS")], conf, 1),
            (
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "abc"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/nonexistent/ns"),
                ],
                conf,
                3,
            ),
        ];
        for (pairs, stdin, code) in cases {
            let out = dispatch(&env(pairs), stdin, false);
            assert_eq!(out.exit, 1, "{pairs:?}");
            let v = out.stdout.expect("error JSON");
            assert_eq!(v["code"], *code, "{pairs:?}: {v}");
            assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(v["cniVersion"].is_string());
        }
    }

    #[test]
    fn error_reply_uses_the_request_version() {
        let out = dispatch(
            &env(&[("CNI_COMMAND", "ADD")]),
            br#"{"cniVersion":"0.3.1","name":"bad name","ipam":{"subnet":"10.0.0.0/24"}}"#,
            false,
        );
        assert_eq!(out.stdout.unwrap()["cniVersion"], "0.3.1");
    }
}
