//! Pod networking through CNI, as kubelet's other runtimes do it: the network list
//! is the first `*.conflist` (or single-plugin `*.conf`/`*.json`) of `conf_dir` in
//! name order, its plugins are the executables of that `type` in `bin_dirs`, and a
//! sandbox's network namespace is attached with ADD (each plugin in order, each
//! given the previous one's result) and detached with DEL (in reverse order, given
//! the ADD result). Every plugin call has a deadline and a bounded answer.
//!
//! Port mappings reach plugins that declare the `portMappings` capability (portmap)
//! as `runtimeConfig.portMappings`, as the CNI conventions say.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How long one plugin call may take.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from a plugin, and largest config file read.
const MAX_BYTES: u64 = 1 << 20;
/// The interface the plugins make in the pod's namespace.
pub const IFNAME: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no CNI network configuration in {0} (a *.conflist, *.conf or *.json file)")]
    NoConfig(PathBuf),
    #[error("CNI configuration {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NoPlugin { plugin: String, dirs: String },
    #[error("CNI plugin {plugin} ({command}): {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
}

/// One network list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    pub path: PathBuf,
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration, as written.
    pub plugins: Vec<Value>,
}

impl NetworkList {
    /// The first network list of `conf_dir` in name order.
    pub fn load(conf_dir: &Path) -> Result<Self, CniError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .map_err(|_| CniError::NoConfig(conf_dir.to_owned()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
            })
            .collect();
        files.sort();
        let path = files
            .into_iter()
            .next()
            .ok_or_else(|| CniError::NoConfig(conf_dir.to_owned()))?;
        let bad = |message: String| CniError::BadConfig {
            path: path.clone(),
            message,
        };
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_BYTES).read_to_end(&mut text))
            .map_err(|e| bad(e.to_string()))?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let name = v["name"]
            .as_str()
            .ok_or_else(|| bad("no \"name\"".into()))?
            .to_owned();
        let cni_version = v["cniVersion"].as_str().unwrap_or("0.4.0").to_owned();
        let plugins = match v.get("plugins") {
            Some(Value::Array(p)) => p.clone(),
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            // A single-plugin .conf is a list of one.
            None => vec![v.clone()],
        };
        if plugins.is_empty() {
            return Err(bad("no plugins".into()));
        }
        for p in &plugins {
            let ok = p["type"]
                .as_str()
                .is_some_and(|t| !t.is_empty() && !t.contains('/') && t != "." && t != "..");
            if !ok {
                return Err(bad(format!("a plugin without a valid \"type\": {p}")));
            }
        }
        Ok(Self {
            path,
            name,
            cni_version,
            plugins,
        })
    }
}

/// A CRI port mapping, as CNI's `portMappings` runtime config spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: i32,
    pub container_port: i32,
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// What is attached: a sandbox's namespace and who it belongs to.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    /// `K8S_POD_NAMESPACE` and the like, for CNI_ARGS.
    pub args: Vec<(String, String)>,
    pub port_mappings: Vec<PortMapping>,
}

/// The plugin directories joined for CNI_PATH.
fn cni_path(bin_dirs: &[PathBuf]) -> String {
    bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs one plugin: its config on stdin, its answer from stdout (an error object on
/// a non-zero exit).
fn exec(
    bin_dirs: &[PathBuf],
    list: &NetworkList,
    plugin: &Value,
    command: &'static str,
    att: &Attachment,
    prev: Option<&Value>,
) -> Result<Value, CniError> {
    let ty = plugin["type"].as_str().unwrap_or_default().to_owned();
    let program = bin_dirs
        .iter()
        .map(|d| d.join(&ty))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::NoPlugin {
            plugin: ty.clone(),
            dirs: cni_path(bin_dirs),
        })?;
    let fail = |message: String| CniError::Plugin {
        plugin: ty.clone(),
        command,
        message,
    };
    let mut conf = plugin.clone();
    conf["name"] = json!(list.name);
    conf["cniVersion"] = json!(list.cni_version);
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    if plugin["capabilities"]["portMappings"] == json!(true) {
        conf["runtimeConfig"]["portMappings"] = json!(att.port_mappings);
    }
    let args: Vec<String> = std::iter::once("IgnoreUnknown=1".to_owned())
        .chain(att.args.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    let mut child = Command::new(&program)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_NETNS", &att.netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", cni_path(bin_dirs))
        .env("CNI_ARGS", args.join(";"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", program.display())))?;
    let input = serde_json::to_vec(&conf).unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&input);
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stdout {
            let _ = s.take(MAX_BYTES).read_to_end(&mut b);
        }
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = stderr {
            let _ = s.take(64 << 10).read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {PLUGIN_TIMEOUT:?}")));
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let answer: Option<Value> = serde_json::from_slice(&out).ok();
    if !status.success() {
        let msg = answer
            .as_ref()
            .and_then(|a| {
                a["msg"].as_str().map(|m| {
                    let details = a["details"].as_str().unwrap_or_default();
                    if details.is_empty() {
                        m.to_owned()
                    } else {
                        format!("{m}: {details}")
                    }
                })
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&err).trim().to_owned());
        return Err(fail(format!("{status}: {msg}")));
    }
    match (command, answer) {
        (_, Some(a)) => Ok(a),
        ("DEL", None) => Ok(Value::Null),
        (_, None) => Err(fail(format!(
            "its answer is not JSON: {}",
            String::from_utf8_lossy(&out)
                .chars()
                .take(200)
                .collect::<String>()
        ))),
    }
}

/// Attaches the sandbox: ADD through every plugin; the last result. A failure
/// part-way detaches what was attached.
pub fn add(bin_dirs: &[PathBuf], list: &NetworkList, att: &Attachment) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for plugin in &list.plugins {
        match exec(bin_dirs, list, plugin, "ADD", att, prev.as_ref()) {
            Ok(r) => prev = Some(r),
            Err(e) => {
                let _ = del(bin_dirs, list, att, prev.as_ref());
                return Err(e);
            }
        }
    }
    Ok(prev.unwrap_or(Value::Null))
}

/// Detaches the sandbox: DEL through every plugin in reverse order, each given the
/// ADD result (if any). Every plugin is called; the first error is returned.
pub fn del(
    bin_dirs: &[PathBuf],
    list: &NetworkList,
    att: &Attachment,
    prev: Option<&Value>,
) -> Result<(), CniError> {
    let mut first = None;
    for plugin in list.plugins.iter().rev() {
        if let Err(e) = exec(bin_dirs, list, plugin, "DEL", att, prev) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The pod's addresses from an ADD result: (CIDR address, gateway), IPv4 first.
pub fn addresses(result: &Value) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| {
                    let a = ip["address"].as_str()?.to_owned();
                    let gw = ip["gateway"].as_str().map(str::to_owned);
                    Some((a, gw))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(a, _)| a.contains(':'));
    out
}

/// The routes of an ADD result: (destination, gateway or "").
pub fn routes(result: &Value) -> Vec<(String, String)> {
    result["routes"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| {
                    Some((
                        r["dst"].as_str()?.to_owned(),
                        r["gw"].as_str().unwrap_or_default().to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn plugin(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn att() -> Attachment {
        Attachment {
            container_id: "sb1".into(),
            netns: "/run/netns/x".into(),
            args: vec![("K8S_POD_NAME".into(), "web".into())],
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        }
    }

    #[test]
    fn cni_list_loads_the_first_file_and_single_confs_become_lists() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            NetworkList::load(d.path()),
            Err(CniError::NoConfig(_))
        ));
        std::fs::write(
            d.path().join("20-b.conf"),
            r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        let l = NetworkList::load(d.path()).unwrap();
        assert_eq!((l.name.as_str(), l.plugins.len()), ("b", 1));
        std::fs::write(
            d.path().join("10-a.conflist"),
            r#"{"cniVersion":"0.4.0","name":"a","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let l = NetworkList::load(d.path()).unwrap();
        assert_eq!((l.name.as_str(), l.plugins.len()), ("a", 2));
        std::fs::write(
            d.path().join("05-bad.conflist"),
            r#"{"name":"x","plugins":[{"type":"../../bin/sh"}]}"#,
        )
        .unwrap();
        let e = NetworkList::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("valid \"type\""), "{e}");
    }

    #[test]
    fn cni_add_chains_results_and_passes_env_and_port_mappings() {
        let bins = tempfile::tempdir().unwrap();
        let log = bins.path().join("log");
        // The first plugin answers with an address; the second records what it got
        // and passes the previous result on.
        plugin(
            bins.path(),
            "first",
            r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","ips":[{"address":"10.88.0.7/16","gateway":"10.88.0.1"}],"routes":[{"dst":"0.0.0.0/0"}]}'"#,
        );
        plugin(
            bins.path(),
            "second",
            &format!(
                r#"in=$(cat); echo "$CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME $CNI_ARGS" >> {l}; echo "$in" >> {l}; echo "$in" | sed 's/.*"prevResult":\(.*\),"runtimeConfig".*/\1/'"#,
                l = log.display()
            ),
        );
        let list = NetworkList {
            path: "x".into(),
            name: "pods".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![
                json!({"type": "first"}),
                json!({"type": "second", "capabilities": {"portMappings": true}}),
            ],
        };
        let dirs = vec![PathBuf::from("/nonexistent"), bins.path().to_owned()];
        let r = add(&dirs, &list, &att()).unwrap();
        assert_eq!(
            addresses(&r),
            vec![("10.88.0.7/16".to_owned(), Some("10.88.0.1".to_owned()))]
        );
        assert_eq!(routes(&r), vec![("0.0.0.0/0".to_owned(), String::new())]);
        let seen = std::fs::read_to_string(&log).unwrap();
        assert!(
            seen.contains("ADD sb1 /run/netns/x eth0 IgnoreUnknown=1;K8S_POD_NAME=web"),
            "{seen}"
        );
        assert!(seen.contains(r#""name":"pods""#), "{seen}");
        assert!(seen.contains(r#""prevResult":{"#), "{seen}");
        assert!(
            seen.contains(
                r#""portMappings":[{"containerPort":80,"hostPort":8080,"protocol":"tcp"}]"#
            ),
            "{seen}"
        );
    }

    #[test]
    fn cni_failures_say_which_plugin_and_undo_what_was_added() {
        let bins = tempfile::tempdir().unwrap();
        let log = bins.path().join("log");
        plugin(
            bins.path(),
            "ok",
            &format!(
                r#"cat >/dev/null; echo "$CNI_COMMAND" >> {}; echo '{{}}'"#,
                log.display()
            ),
        );
        plugin(
            bins.path(),
            "broken",
            r#"cat >/dev/null; echo '{"code":11,"msg":"no addresses left","details":"10.88.0.0/16 is full"}'; exit 1"#,
        );
        let list = NetworkList {
            path: "x".into(),
            name: "pods".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![json!({"type": "ok"}), json!({"type": "broken"})],
        };
        let dirs = vec![bins.path().to_owned()];
        let e = add(&dirs, &list, &att()).unwrap_err().to_string();
        assert!(
            e.contains("broken (ADD)") && e.contains("no addresses left: 10.88.0.0/16 is full"),
            "{e}"
        );
        // The first plugin was added, then deleted again (DEL runs every plugin).
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "ADD\nDEL\n");
        let missing = NetworkList {
            plugins: vec![json!({"type": "nowhere"})],
            ..list
        };
        let e = add(&dirs, &missing, &att()).unwrap_err().to_string();
        assert!(e.contains("\"nowhere\" not found"), "{e}");
    }
}
