//! The deployment files in deploy/: the systemd unit and its sysusers file, the Dockerfile, the
//! Helm chart and the plain manifests rendered from it. No root and no BPF: the tools are the
//! machine's systemd and the pinned ones `cargo xtask setup` puts in a venv under
//! $CARGO_HOME/resil-tools (helm, kubernetes-validate with PyYAML, hadolint).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use resil_tests::resil_bin;
use serde_json::Value;

/// The Kubernetes version the chart is rendered for (its kubeVersion is >= 1.30).
const KUBERNETES: &str = "1.31.0";
/// The versions the manifests are validated against: the oldest the chart allows and the
/// newest whose schemas ship with kubernetes-validate.
const VALIDATED: [&str; 2] = ["1.30.0", "1.37.0"];
/// The core objects of a default render, as kubernetes-validate names them.
const CORE: [&str; 4] = [
    "serviceaccount/resil",
    "configmap/resil",
    "service/resil",
    "daemonset/resil",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A validation tool from the venv `cargo xtask setup` makes: the same CARGO_HOME logic as
/// xtask/src/setup.rs (CARGO_HOME, else ~/.cargo).
fn tool(name: &str) -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let path = cargo_home.join("resil-tools/venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (it installs the deployment tools)",
        path.display()
    );
    path
}

/// A scratch directory of one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("resil-deploy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, text).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Stdout and stderr together.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read(relative: &str) -> String {
    fs::read_to_string(repo().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// `program` with helm's cache, config and data homes in the scratch dir.
fn with_helm_homes(scratch: &Scratch, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("HELM_CACHE_HOME", scratch.path("helm/cache"))
        .env("HELM_CONFIG_HOME", scratch.path("helm/config"))
        .env("HELM_DATA_HOME", scratch.path("helm/data"));
    cmd
}

/// helm, with its homes in the scratch dir and the repository as cwd.
fn helm(scratch: &Scratch) -> Command {
    let mut cmd = with_helm_homes(scratch, tool("helm"));
    cmd.current_dir(repo());
    cmd
}

/// `helm template` of the chart as release resil in namespace resil, with `extra` arguments;
/// the output, or the error helm printed.
fn template(scratch: &Scratch, extra: &[OsString]) -> Result<String, String> {
    let mut cmd = helm(scratch);
    cmd.args([
        "template",
        "resil",
        "deploy/helm/resil",
        "--namespace",
        "resil",
    ]);
    cmd.args(["--kube-version", KUBERNETES]);
    cmd.args(extra);
    let out = run(&mut cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

/// The chart rendered, with a values file if given; helm must succeed.
fn render(scratch: &Scratch, values: Option<&str>) -> String {
    let extra: Vec<OsString> = values
        .map(|values| {
            vec![
                "--values".into(),
                scratch.write("values.yaml", values).into(),
            ]
        })
        .unwrap_or_default();
    template(scratch, &extra).unwrap_or_else(|e| panic!("helm template failed:\n{e}"))
}

/// The YAML documents of `yaml`, as JSON values (PyYAML from the venv does the parsing).
fn documents(scratch: &Scratch, yaml: &str) -> Vec<Value> {
    let file = scratch.write("documents.yaml", yaml);
    let out = run(Command::new(tool("python3"))
        .arg("-c")
        .arg(
            "import sys, json, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
         json.dump(docs, sys.stdout)",
        )
        .arg(file));
    assert!(out.status.success(), "cannot parse YAML:\n{}", text(&out));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("JSON")
}

/// The document of `kind` named `name`.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the rendered objects"))
}

/// Validates manifests strictly (unknown fields are errors) against Kubernetes' schemas and
/// returns the objects that passed. Kinds without a schema (custom resources: the
/// ServiceMonitor) are only warned about by kubernetes-validate: any other warning fails.
fn validate(scratch: &Scratch, manifests: &str) -> BTreeSet<String> {
    let file = scratch.write("manifests.yaml", manifests);
    let mut report = String::new();
    for version in VALIDATED {
        let out = run(Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .arg(&file));
        let said = text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{said}"
        );
        report += &said;
    }
    let mut passed = BTreeSet::new();
    for line in report.lines() {
        if let Some(rest) = line.strip_prefix("INFO ") {
            let object = rest
                .split(" passed for resource ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected line: {line}"));
            passed.insert(object.to_string());
        } else {
            assert!(
                line.starts_with("WARN ")
                    && line
                        .contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                "kubernetes-validate says: {line}\n{report}"
            );
        }
    }
    passed
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_string())
        .collect()
}

/// The value following `flag` in `args`, if any.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Every value of a repeated `flag`.
fn flags(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

/// The agent container of the DaemonSet `name`.
fn agent<'a>(docs: &'a [Value], name: &str) -> &'a Value {
    let containers = &object(docs, "DaemonSet", name)["spec"]["template"]["spec"]["containers"];
    containers
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "resil"))
        .expect("container resil")
}

/// The capabilities a container adds.
fn added_caps(container: &Value) -> BTreeSet<String> {
    strings(&container["securityContext"]["capabilities"]["add"])
        .into_iter()
        .collect()
}

/// The values of the unit's `key=` lines.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_verifies_without_a_warning() {
    let scratch = Scratch::new("unit");
    let unit = read("deploy/systemd/resil.service");
    let exec = "ExecStart=/usr/local/bin/resil daemon --socket-group resil\n";
    assert_eq!(unit.matches(exec).count(), 1, "ExecStart changed?\n{unit}");
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let local = unit.replace(
        exec,
        &format!(
            "ExecStart={} daemon --socket-group resil\n",
            resil_bin().display()
        ),
    );
    let path = scratch.write("resil.service", &local);
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let said = text(&out);
    assert!(out.status.success(), "systemd-analyze verify:\n{said}");
    let about_the_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("resil.service") || l.contains(&*path.to_string_lossy()))
        .collect();
    assert!(
        about_the_unit.is_empty(),
        "systemd-analyze verify warns:\n{}",
        about_the_unit.join("\n")
    );
}

#[test]
fn systemd_unit_grants_three_capabilities_and_stays_hardened() {
    let scratch = Scratch::new("security");
    let unit = read("deploy/systemd/resil.service");
    let three = vec!["CAP_BPF CAP_NET_ADMIN CAP_PERFMON".to_string()];
    assert_eq!(unit_values(&unit, "CapabilityBoundingSet"), three);
    assert_eq!(unit_values(&unit, "AmbientCapabilities"), three);
    assert_eq!(unit_values(&unit, "ReadWritePaths"), ["/sys/fs/bpf"]);
    // `private` or `strict` would put the daemon in a cgroup namespace rooted at its own
    // cgroup, and it would attach connect4/6 there only.
    assert_eq!(unit_values(&unit, "ProtectControlGroups"), ["yes"]);
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(unit_values(&unit, key), [value], "{key}=");
    }
    assert!(unit_values(&unit, "PrivateNetwork").is_empty());
    assert_eq!(unit_values(&unit, "RuntimeDirectory"), ["resil"]);
    assert_eq!(unit_values(&unit, "Type"), ["simple"]);

    // systemd's own exposure score (0 best, 10 worst), 2.0 with systemd 252: no worse.
    let path = scratch.write("resil.service", &unit);
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path));
    let said = text(&out);
    let score: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for resil.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{said}"));
    assert!(score <= 2.0, "exposure {score} (at most 2.0):\n{said}");
}

#[test]
fn sysusers_creates_the_socket_group_the_unit_uses() {
    let scratch = Scratch::new("sysusers");
    let unit = read("deploy/systemd/resil.service");
    assert_eq!(unit_values(&unit, "SupplementaryGroups"), ["resil"]);
    let out = run(Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(format!("--root={}", scratch.0.display()))
        .arg(repo().join("deploy/systemd/resil.sysusers")));
    let said = text(&out);
    assert!(out.status.success(), "systemd-sysusers:\n{said}");
    assert!(said.contains("Creating group 'resil'"), "{said}");
    assert!(!said.contains("resil.sysusers:"), "complaints:\n{said}");
}

#[test]
fn dockerfile_lints_and_builds_with_the_linker_setup_pins() {
    let out = run(Command::new(tool("hadolint"))
        .arg("--no-color")
        .arg(repo().join("deploy/Dockerfile")));
    assert!(out.status.success(), "hadolint:\n{}", text(&out));
    assert_eq!(text(&out).trim(), "", "hadolint");

    let dockerfile = read("deploy/Dockerfile");
    let setup = read("xtask/src/setup.rs");
    let pinned = setup
        .lines()
        .find_map(|l| l.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("BPF_LINKER_VERSION in xtask/src/setup.rs");
    assert!(
        dockerfile.contains(&format!("ARG BPF_LINKER_VERSION={pinned}\n")),
        "the Dockerfile must build bpf-linker {pinned}, as cargo xtask setup does"
    );
    // A dated nightly, handed to resil-user/build.rs: the image keeps building as nightlies move.
    assert!(
        dockerfile.contains("ARG NIGHTLY=nightly-20"),
        "a dated nightly"
    );
    assert!(dockerfile.contains("ENV RESIL_BPF_TOOLCHAIN=${NIGHTLY}\n"));
    assert!(read("resil-user/build.rs").contains("RESIL_BPF_TOOLCHAIN"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/resil\"]\n"));
    assert!(dockerfile.contains("CMD [\"daemon\"]\n"));

    let ignore = read(".dockerignore");
    for excluded in ["target", ".git"] {
        assert!(
            ignore.lines().any(|l| l == excluded),
            ".dockerignore: {excluded}"
        );
    }
}

#[test]
fn helm_chart_lints_strictly() {
    let scratch = Scratch::new("lint");
    let out = run(helm(&scratch).args(["lint", "--strict", "deploy/helm/resil"]));
    let said = text(&out);
    assert!(out.status.success(), "helm lint --strict:\n{said}");
    assert!(
        said.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{said}"
    );
    assert!(
        !said.contains("[WARNING]") && !said.contains("[ERROR]"),
        "{said}"
    );
}

#[test]
fn default_render_is_valid_kubernetes() {
    let scratch = Scratch::new("default");
    let manifests = render(&scratch, None);
    assert_eq!(validate(&scratch, &manifests), set(&CORE));
}

#[test]
fn committed_manifests_are_the_default_render() {
    let scratch = Scratch::new("committed");
    let out = run(with_helm_homes(&scratch, "sh")
        .arg(repo().join("deploy/kubernetes/render.sh"))
        .env("HELM", tool("helm")));
    assert!(out.status.success(), "render.sh:\n{}", text(&out));
    let committed = read("deploy/kubernetes/resil.yaml");
    assert!(
        committed == String::from_utf8_lossy(&out.stdout),
        "deploy/kubernetes/resil.yaml differs from the chart's default render: run \
         `deploy/kubernetes/render.sh > deploy/kubernetes/resil.yaml`"
    );
    let mut expected = set(&CORE);
    expected.insert("namespace/resil".into());
    assert_eq!(validate(&scratch, &committed), expected);
    let docs = documents(&scratch, &committed);
    let namespace = object(&docs, "Namespace", "resil");
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

#[test]
fn daemonset_asks_only_for_what_the_daemon_needs_and_is_probed() {
    let scratch = Scratch::new("daemonset");
    let docs = documents(&scratch, &render(&scratch, None));
    let pod = &object(&docs, "DaemonSet", "resil")["spec"]["template"]["spec"];
    let container = agent(&docs, "resil");
    let security = &container["securityContext"];

    assert_eq!(added_caps(container), set(&["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    // The runtimes' default AppArmor profiles deny writes to /sys/fs/bpf.
    assert_eq!(security["appArmorProfile"]["type"], "Unconfined");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(pod["hostPID"].is_null() && pod["hostIPC"].is_null());
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        object(&docs, "ServiceAccount", "resil")["automountServiceAccountToken"],
        false
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str().is_some_and(|k| k.contains("Role"))),
        "without kubernetesNames the daemon never calls the API server: no RBAC"
    );

    // Probes on the port the daemon serves metrics on.
    let args = strings(&container["args"]);
    assert_eq!(args[0], "daemon");
    assert_eq!(flag(&args, "--metrics"), Some("0.0.0.0:9464"));
    let port = &container["ports"][0];
    assert_eq!(
        (&port["name"], &port["containerPort"]),
        (&"metrics".into(), &9464.into())
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");

    // The flags name what is mounted: the host's cgroup root (read-only), the bpffs.
    let mount = |path: &str| -> (Value, Value) {
        let mounts = container["volumeMounts"].as_array().expect("mounts");
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("nothing mounted at {path}"));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("volume")
            .clone();
        (m.clone(), volume)
    };
    let (m, v) = mount(flag(&args, "--cgroup").expect("--cgroup"));
    assert_eq!(
        (&m["readOnly"], &v["hostPath"]["path"]),
        (&true.into(), &"/sys/fs/cgroup".into())
    );
    let (m, v) = mount(flag(&args, "--pin-dir").expect("--pin-dir"));
    assert_eq!(v["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(m["mountPropagation"], "HostToContainer");
    assert!(m["readOnly"].is_null());
    let (_, v) = mount(flag(&args, "--socket").expect("--socket"));
    assert_eq!(v["hostPath"]["path"], "/run/resil");
    let (m, v) = mount(flag(&args, "--config").expect("--config"));
    assert_eq!(
        (&m["readOnly"], &v["configMap"]["name"]),
        (&true.into(), &"resil".into())
    );
}

#[test]
fn custom_values_render_valid_manifests() {
    let scratch = Scratch::new("custom");
    let manifests = render(
        &scratch,
        Some(
            "interfaces: [eth0, eth1]\n\
             extraArgs: [--bpf-log, warn]\n\
             metricsPort: 9500\n\
             socketGroup: 1000\n\
             seccompProfile: {type: Unconfined}\n\
             seLinuxOptions: {type: spc_t}\n\
             serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}\n\
             kubernetesNames: true\n\
             tcMode: clsact\n\
             hostCgroupRoot: /sys/fs/cgroup/unified\n",
        ),
    );
    let mut expected = set(&CORE);
    expected.extend(set(&["clusterrole/resil", "clusterrolebinding/resil"]));
    assert_eq!(validate(&scratch, &manifests), expected);

    let docs = documents(&scratch, &manifests);
    let container = agent(&docs, "resil");
    let args = strings(&container["args"]);
    assert_eq!(flags(&args, "--iface"), ["eth0", "eth1"]);
    assert_eq!(flag(&args, "--tc-mode"), Some("clsact"));
    assert_eq!(flag(&args, "--xdp-mode"), Some("auto"));
    let pod = &object(&docs, "DaemonSet", "resil")["spec"]["template"]["spec"];
    let cgroup = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "cgroup"))
        .expect("volume cgroup");
    assert_eq!(cgroup["hostPath"]["path"], "/sys/fs/cgroup/unified");
    // --kubernetes-names: a token, and read access to pods and services, nothing more.
    assert!(args.iter().any(|a| a == "--kubernetes-names"));
    assert_eq!(pod["automountServiceAccountToken"], true);
    let role = object(&docs, "ClusterRole", "resil");
    assert_eq!(role["rules"].as_array().map(Vec::len), Some(1));
    assert_eq!(strings(&role["rules"][0]["apiGroups"]), [""]);
    assert_eq!(
        strings(&role["rules"][0]["resources"]),
        ["pods", "services"]
    );
    assert_eq!(strings(&role["rules"][0]["verbs"]), ["list", "watch"]);
    let binding = object(&docs, "ClusterRoleBinding", "resil");
    assert_eq!(binding["roleRef"]["name"], "resil");
    assert_eq!(binding["subjects"][0]["name"], pod["serviceAccountName"]);
    assert_eq!(binding["subjects"][0]["namespace"], "resil");
    assert_eq!(&args[args.len() - 2..], ["--bpf-log", "warn"]);
    assert_eq!(flag(&args, "--metrics"), Some("0.0.0.0:9500"));
    assert_eq!(flag(&args, "--socket-group"), Some("1000"));
    assert_eq!(container["ports"][0]["containerPort"], 9500);
    // In the group it gives the socket to: no CAP_CHOWN for that.
    assert_eq!(added_caps(container), set(&["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(
        pod["securityContext"]["supplementalGroups"],
        serde_json::json!([1000])
    );
    assert_eq!(
        container["securityContext"]["seccompProfile"]["type"],
        "Unconfined"
    );
    assert_eq!(
        container["securityContext"]["seLinuxOptions"]["type"],
        "spc_t"
    );

    // The ServiceMonitor has no schema among Kubernetes' own: check what makes it scrape.
    let service = object(&docs, "Service", "resil");
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["ports"][0]["port"], 9500);
    let monitor = object(&docs, "ServiceMonitor", "resil");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["namespace"], "resil");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "selects the Service"
        );
    }
    assert_eq!(
        strings(&monitor["spec"]["namespaceSelector"]["matchNames"]),
        ["resil"]
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(endpoint["interval"], "15s");
    let known: BTreeSet<&str> = ["port", "path", "interval", "scrapeTimeout", "relabelings"].into();
    for key in endpoint.as_object().unwrap().keys() {
        assert!(
            known.contains(key.as_str()),
            "unexpected endpoint field {key}"
        );
    }
}

#[test]
fn cleanup_mode_replaces_the_agent_with_a_cleanup_daemonset() {
    let scratch = Scratch::new("cleanup");
    let manifests = render(&scratch, Some("cleanup: true\n"));
    let expected = set(&[
        "serviceaccount/resil",
        "configmap/resil",
        "service/resil",
        "daemonset/resil-cleanup",
    ]);
    assert_eq!(validate(&scratch, &manifests), expected);
    let docs = documents(&scratch, &manifests);
    let pod = &object(&docs, "DaemonSet", "resil-cleanup")["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(
        strings(&init["args"]),
        ["daemon", "--cleanup", "--pin-dir", "/sys/fs/bpf/resil"]
    );
    assert_eq!(added_caps(init), set(&["BPF", "NET_ADMIN", "PERFMON"]));
    assert_eq!(init["securityContext"]["privileged"], false);
    assert_eq!(pod["hostNetwork"], true);
}

#[test]
fn chart_policy_is_valid_and_starts_in_metrics_only_mode() {
    let scratch = Scratch::new("policy");
    // One policy to start from, for hosts and the chart: the chart's files/resil.toml.
    let policy = read("deploy/helm/resil/files/resil.toml");
    let file = scratch.write("resil.toml", &policy);
    let check = run(Command::new(resil_bin())
        .args(["config", "check"])
        .arg(&file));
    assert!(
        check.status.success(),
        "resil config check on the chart's policy:\n{}",
        text(&check)
    );
    // The same check refuses a broken policy, so the pass above means something.
    let broken = scratch.write(
        "broken.toml",
        &policy.replace("[defaults]", "[defaults]\nbogus = 1"),
    );
    let check = run(Command::new(resil_bin())
        .args(["config", "check"])
        .arg(&broken));
    assert!(!check.status.success(), "a bogus key passes the check");

    let out = run(Command::new(tool("python3"))
        .arg("-c")
        .arg(
            "import sys, tomllib\n\
         print(tomllib.load(open(sys.argv[1], 'rb'))['defaults']['mode'])",
        )
        .arg(&file));
    assert_eq!(
        text(&out).trim(),
        "metrics_only",
        "roll-out starts observing only"
    );

    // The ConfigMap carries it as is.
    let docs = documents(&scratch, &render(&scratch, None));
    assert_eq!(
        object(&docs, "ConfigMap", "resil")["data"]["resil.toml"],
        policy.as_str()
    );
}

#[test]
fn a_policy_change_rolls_the_pods() {
    let scratch = Scratch::new("checksum");
    let checksum = |values: Option<&str>| {
        let docs = documents(&scratch, &render(&scratch, values));
        object(&docs, "DaemonSet", "resil")["spec"]["template"]["metadata"]["annotations"]
            ["checksum/config"]
            .as_str()
            .expect("checksum/config")
            .to_string()
    };
    let default = checksum(None);
    assert_eq!(default.len(), 64);
    assert_eq!(checksum(None), default);
    let changed = checksum(Some("config: |\n  [defaults]\n  mode = \"enforce\"\n"));
    assert_ne!(changed, default);
}

/// `helm template` with `--set` values; the output, or the error helm printed.
fn render_set(scratch: &Scratch, sets: &[&str]) -> Result<String, String> {
    let extra: Vec<OsString> = sets
        .iter()
        .flat_map(|set| ["--set".into(), set.into()])
        .collect();
    template(scratch, &extra)
}

#[test]
fn values_the_daemon_would_refuse_fail_the_render_with_a_reason() {
    let scratch = Scratch::new("refuse");
    // IPv6 listen addresses get their brackets, as --metrics wants them.
    let docs = documents(
        &scratch,
        &render_set(&scratch, &["metricsAddress=::"]).unwrap(),
    );
    let args = strings(&agent(&docs, "resil")["args"]);
    assert_eq!(flag(&args, "--metrics"), Some("[::]:9464"));
    let out = run(Command::new(resil_bin()).args(["daemon", "--metrics", "[::]:9464", "--help"]));
    assert!(out.status.success(), "{}", text(&out));

    for (set, says) in [
        (
            "metricsAddress=127.0.0.1",
            "is loopback: the kubelet probes",
        ),
        ("socketGroup=resil", "must be a group id (a number)"),
        (
            "tcMode=netlink",
            "tcMode \"netlink\" must be one of: auto, tcx, clsact",
        ),
        (
            "xdpMode=skb",
            "xdpMode \"skb\" must be one of: auto, native, generic",
        ),
    ] {
        let err = render_set(&scratch, &[set]).expect_err(set);
        assert!(err.contains(says), "{set}: {err}");
    }
}
