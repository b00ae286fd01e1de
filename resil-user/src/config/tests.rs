use super::*;
use crate::error::exit_code;

fn parse(text: &str) -> Result<Config> {
    Config::parse(text, Source::File(PathBuf::from("resil.toml")))
}

/// The one-sentence error for `text`, checked to be a usage error (exit 2) naming the file.
fn error(text: &str) -> String {
    let e = parse(text).expect_err("invalid");
    assert_eq!(exit_code(&e), 2);
    let message = format!("{e:#}");
    assert!(message.contains("resil.toml"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    message
}

#[test]
fn the_embedded_file_is_the_built_in_defaults() {
    let embedded = Config::parse(EMBEDDED, Source::Embedded).unwrap();
    let empty = parse("").unwrap();
    assert_eq!(embedded.policies, empty.policies);
    assert_eq!(embedded.policies.defaults, Policy::default());
    assert_eq!(embedded.tick, Duration::from_millis(100));
    assert_eq!(embedded.fail_open_after, Duration::from_secs(3));
}

#[test]
fn every_key_can_be_set() {
    let c = parse(
        r#"
        [daemon]
        tick = "250ms"
        fail_open_after = "5s"
        [defaults]
        connect_timeout = "300ms"
        mode = "metrics_only"
        failures = ["refused", "timeout"]
        failure_rate_threshold = 0.25
        minimum_calls = 7
        consecutive_failures = 0
        slow_call_duration = "2s"
        slow_call_rate_threshold = 0.9
        sliding_window = "count"
        window_calls = 50
        open_wait = "1s"
        open_wait_max = "30s"
        open_wait_multiplier = 3.0
        open_wait_jitter = 0.0
        backoff_decay = "0s"
        half_open_probes = 3
        half_open_max_duration = "10s"
        "#,
    )
    .unwrap();
    let p = c.policies.defaults;
    let b = p.breaker;
    assert_eq!(c.tick, Duration::from_millis(250));
    assert_eq!(c.fail_open_after, Duration::from_secs(5));
    assert_eq!(p.connect_timeout, Duration::from_millis(300));
    assert_eq!(b.mode, Mode::MetricsOnly);
    assert_eq!(
        b.failures,
        FailureSet::of(&[FailureKind::Refused, FailureKind::Timeout])
    );
    assert_eq!(
        (
            b.failure_rate_threshold,
            b.minimum_calls,
            b.consecutive_failures
        ),
        (0.25, 7, 0)
    );
    assert_eq!(
        (b.slow_call_ns, b.slow_call_rate_threshold),
        (2_000_000_000, 0.9)
    );
    assert_eq!(b.window, WindowPolicy::Count { calls: 50 });
    assert_eq!(
        (b.backoff.base_ns, b.backoff.max_ns),
        (1_000_000_000, 30_000_000_000)
    );
    assert_eq!(
        (b.backoff.multiplier, b.backoff.jitter, b.backoff.decay_ns),
        (3.0, 0.0, 0)
    );
    assert_eq!(
        (b.half_open_probes, b.half_open_max_ns),
        (3, 10_000_000_000)
    );
}

#[test]
fn dependencies_inherit_the_defaults_and_override_them() {
    let c = parse(
        r#"
        [defaults]
        minimum_calls = 7
        [[dependency]]
        name = "postgres"
        endpoints = ["10.0.3.7:5432", "10.0.4.0/24:5432"]
        policy = { consecutive_failures = 3 }
        [[dependency]]
        name = "redis"
        endpoints = ["[fd00::/64]:6379"]
        [dependency.policy]
        sliding_window = "count"
        "#,
    )
    .unwrap();
    let pg = &c.policies.dependencies[0];
    assert_eq!(pg.name, "postgres");
    assert_eq!(pg.endpoints.len(), 2);
    assert_eq!(pg.policy.breaker.minimum_calls, 7, "inherited");
    assert_eq!(pg.policy.breaker.consecutive_failures, 3, "overridden");
    let redis = &c.policies.dependencies[1];
    assert_eq!(
        redis.policy.breaker.window,
        WindowPolicy::Count { calls: 100 }
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let m = error("[defaults]\nconnect_timeout = \n");
    assert!(m.contains("line 2"), "{m}");
}

#[test]
fn unknown_keys_are_errors() {
    let m = error("[daemon]\ntick = \"100ms\"\ntickk = 3\n");
    assert!(m.contains("line 3") && m.contains("tickk"), "{m}");
    let m = error("[defualts]\n");
    assert!(m.contains("defualts"), "{m}");
    let m = error("[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\nminimum_calls = 3\n");
    assert!(m.contains("minimum_calls") && m.contains("line 4"), "{m}");
}

#[test]
fn out_of_range_values_say_what_was_expected() {
    for (text, key, expected) in [
        ("[daemon]\ntick = \"1ms\"", "tick", "from 10ms to 10s"),
        (
            "[defaults]\nconnect_timeout = \"soon\"",
            "connect_timeout",
            "duration",
        ),
        (
            "[defaults]\nconnect_timeout = 5",
            "connect_timeout",
            "duration",
        ),
        (
            "[defaults]\nfailure_rate_threshold = 1.5",
            "failure_rate_threshold",
            "at most 1",
        ),
        (
            "[defaults]\nfailure_rate_threshold = 0",
            "failure_rate_threshold",
            "above 0",
        ),
        (
            "[defaults]\nslow_call_rate_threshold = -1",
            "slow_call_rate_threshold",
            "above 0",
        ),
        (
            "[defaults]\nminimum_calls = 0",
            "minimum_calls",
            "from 1 to",
        ),
        (
            "[defaults]\nconsecutive_failures = -2",
            "consecutive_failures",
            "from 0 to",
        ),
        (
            "[defaults]\nhalf_open_probes = 0",
            "half_open_probes",
            "from 1 to 64",
        ),
        (
            "[defaults]\nwindow_buckets = 5000",
            "window_buckets",
            "from 1 to 1000",
        ),
        (
            "[defaults]\nopen_wait_multiplier = 0.5",
            "open_wait_multiplier",
            "from 1 to 10",
        ),
        (
            "[defaults]\nopen_wait_jitter = 2",
            "open_wait_jitter",
            "from 0 to 1",
        ),
        ("[defaults]\nmode = \"yolo\"", "mode", "enforce"),
        (
            "[defaults]\nfailures = [\"refused\", \"slow\"]",
            "failures",
            "timeout",
        ),
        (
            "[defaults]\nsliding_window = \"ring\"",
            "sliding_window",
            "count",
        ),
    ] {
        let m = error(text);
        assert!(
            m.contains("line 2") && m.contains(key) && m.contains(expected),
            "{text}: {m}"
        );
    }
}

#[test]
fn inconsistent_settings_are_errors() {
    let m = error("[daemon]\ntick = \"1s\"\nfail_open_after = \"1s\"\n");
    assert!(
        m.contains("fail_open_after (1s) must be at least twice tick (1s)"),
        "{m}"
    );
    let m = error("[defaults]\nopen_wait = \"2m\"\nopen_wait_max = \"1m\"\n");
    assert!(
        m.contains("open_wait (2m) is longer than open_wait_max (1m)"),
        "{m}"
    );
    let m = error("[defaults]\nsliding_window = \"count\"\nwindow_duration = \"5s\"\n");
    assert!(
        m.contains("window_duration") && m.contains("\"time\""),
        "{m}"
    );
    let m = error("[defaults]\nwindow_calls = 10\n");
    assert!(
        m.contains("window_calls applies to sliding_window = \"count\""),
        "{m}"
    );
    let m = error("[defaults]\nwindow_duration = \"100ms\"\nwindow_buckets = 1000\n");
    assert!(m.contains("under 1ms"), "{m}");
    let m = error(
        "[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\npolicy = { open_wait = \"50m\" }\n",
    );
    assert!(
        m.contains("line 4") && m.contains("dependency a: open_wait (50m) is longer"),
        "{m}"
    );
    let m = error(
        "[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\npolicy = { open_wait = \"2h\" }\n",
    );
    assert!(m.contains("line 4") && m.contains("not \"2h\""), "{m}");
}

#[test]
fn errors_in_inline_tables_name_the_inner_key() {
    let m = error(
        "[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\npolicy = { half_open_probes = 0 }\n",
    );
    assert!(m.contains("line 4: half_open_probes:"), "{m}");
}

#[test]
fn cross_check_errors_point_at_the_key() {
    let m = error("[defaults]\nminimum_calls = 5\n\nopen_wait = \"2m\"\nopen_wait_max = \"1m\"\n");
    assert!(m.contains("line 4") && m.contains("open_wait (2m)"), "{m}");
    let m = error("[defaults]\nsliding_window = \"count\"\nwindow_calls = 10\n");
    assert!(
        m.contains("line 3") && m.contains("minimum_calls (20) is more than window_calls (10)"),
        "{m}"
    );
    let m = error("[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\n[dependency.policy]\nconnect_timeout = \"1s\"\nopen_wait = \"50m\"\n");
    assert!(
        m.contains("line 6") && m.contains("dependency a: open_wait"),
        "{m}"
    );
}

#[test]
fn policies_that_could_never_work_are_refused() {
    let m = error("[defaults]\nfailures = []\n");
    assert!(m.contains("failures: expected at least one"), "{m}");
    let m = error("[[dependency]]\nname = \"a\"\nendpoints = [\"fd00::7:443\"]\n");
    assert!(m.contains("line 3") && m.contains("brackets"), "{m}");
}

#[test]
fn dependency_errors() {
    let m = error("[[dependency]]\nname = \"a\"\nendpoints = []\n");
    assert!(
        m.contains("dependency a: endpoints: expected at least one"),
        "{m}"
    );
    let m = error("[[dependency]]\nname = \" \"\nendpoints = [\"*:1\"]\n");
    assert!(m.contains("non-empty name"), "{m}");
    let m = error("[[dependency]]\nendpoints = [\"*:1\"]\n");
    assert!(m.contains("name"), "{m}");
    let m = error(
        "[[dependency]]\nname = \"a\"\nendpoints = [\"*:1\"]\n\n[[dependency]]\nname = \"a\"\nendpoints = [\"*:2\"]\n",
    );
    assert!(
        m.contains("line 6") && m.contains("already used on line 2"),
        "{m}"
    );
    let m = error("[[dependency]]\nname = \"a\"\nendpoints = [\"10.0.0.1:99999\"]\n");
    assert!(
        m.contains("line 3") && m.contains("port from 1 to 65535"),
        "{m}"
    );
}

#[test]
fn overlapping_dependencies_must_agree() {
    let clash = "[[dependency]]\nname = \"a\"\nendpoints = [\"10.0.0.0/8:80\"]\npolicy = { half_open_probes = 2 }\n\
                 [[dependency]]\nname = \"b\"\nendpoints = [\"10.0.0.0/8:80\"]\npolicy = { half_open_probes = 3 }\n";
    let m = error(clash);
    assert!(
        m.contains("a and b both claim 10.0.0.0/8:80") && m.contains("line 7"),
        "{m}"
    );
    // `*:80` and `0.0.0.0/0:80` are the same scope for IPv4 endpoints.
    let m = error(
        &clash
            .replace(
                "endpoints = [\"10.0.0.0/8:80\"]\npolicy = { half_open_probes = 2",
                "endpoints = [\"*:80\"]\npolicy = { half_open_probes = 2",
            )
            .replace(
                "endpoints = [\"10.0.0.0/8:80\"]\npolicy = { half_open_probes = 3",
                "endpoints = [\"0.0.0.0/0:80\"]\npolicy = { half_open_probes = 3",
            ),
    );
    assert!(m.contains("both claim"), "{m}");
    // The same settings are not a contradiction, and a more specific pattern is no overlap.
    parse(&clash.replace("half_open_probes = 3", "half_open_probes = 2")).unwrap();
    parse(&clash.replace(
        "endpoints = [\"10.0.0.0/8:80\"]\npolicy = { half_open_probes = 3",
        "endpoints = [\"10.0.0.0/16:80\"]\npolicy = { half_open_probes = 3",
    ))
    .unwrap();
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let e = Config::load(Some(Path::new("/nonexistent/resil.toml"))).unwrap_err();
    assert_eq!(exit_code(&e), 2);
    assert!(format!("{e:#}").contains("/nonexistent/resil.toml"));
}

#[test]
fn enforcement_limits() {
    let m = error("[defaults]\nhalf_open_probes = 65\n");
    assert!(
        m.contains("line 2: half_open_probes: expected a whole number from 1 to 64"),
        "{m}"
    );
    let m = error("[daemon]\nfail_open_after = \"50ms\"\n");
    assert!(
        m.contains("line 2: fail_open_after") && m.contains("from 200ms"),
        "{m}"
    );
    let m = error("[daemon]\ntick = \"1s\"\nfail_open_after = \"1s\"\n");
    assert!(
        m.contains("fail_open_after (1s) must be at least twice tick (1s)"),
        "{m}"
    );
    let m = error("[defaults]\nhalf_open_max_duration = \"0s\"\n");
    assert!(
        m.contains("half_open_max_duration") && m.contains("from 1s"),
        "{m}"
    );
    let c = parse("[daemon]\nfail_open_after = \"5s\"\n").unwrap();
    assert_eq!(c.fail_open_after, Duration::from_secs(5));
}

#[test]
fn metrics_dns_and_service_keys() {
    let c = parse(
        r#"
        [daemon]
        dns_timeout = "500ms"
        [metrics]
        max_endpoints = 50
        [[service]]
        name = "api"
        port = 8080
        address = "10.0.0.2"
        shed_when_unhealthy = true
        max_connections = 1000
        [[service]]
        port = 8080
        max_connections = 10
        "#,
    )
    .unwrap();
    assert_eq!(c.dns_timeout, Duration::from_millis(500));
    assert_eq!(c.metrics_max_endpoints, 50);
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[0].label(), "api (10.0.0.2:8080)");
    assert_eq!(c.services[0].max_connections, Some(1000));
    assert!(!c.services[1].shed_when_unhealthy);
    let defaults = parse("").unwrap();
    assert_eq!(defaults.dns_timeout, Duration::from_secs(2));
    assert_eq!(defaults.metrics_max_endpoints, 500);
    assert!(defaults.services.is_empty());
}

#[test]
fn service_errors() {
    let e = error("[[service]]\nport = 8080\n");
    assert!(
        e.contains("line 1") && e.contains("the entry does nothing"),
        "{e}"
    );
    let e = error("[[service]]\nport = 70000\nmax_connections = 1\n");
    assert!(
        e.contains("line 2: port: expected a whole number from 1 to 65535"),
        "{e}"
    );
    let e = error("[[service]]\nport = 80\naddress = \"nope\"\nshed_when_unhealthy = true\n");
    assert!(e.contains("address: expected an IP address"), "{e}");
    let e = error("[[service]]\nport = 80\nmax_connections = 5\n[[service]]\nport = 80\nshed_when_unhealthy = true\n");
    assert!(
        e.contains("line 4") && e.contains("the same service as :80 above"),
        "{e}"
    );
    let e = error("[[service]]\nport = 80\nmax_conections = 5\n");
    assert!(e.contains("unknown field `max_conections`"), "{e}");
    let e = error("[metrics]\nmax_endpoints = -1\n");
    assert!(
        e.contains("max_endpoints: expected a whole number from 0 to 100000"),
        "{e}"
    );
    let e = error("[daemon]\ndns_timeout = \"5ms\"\n");
    assert!(
        e.contains("dns_timeout: expected a duration from 100ms to 1m"),
        "{e}"
    );
}
