//! The `phm` binary end to end: input errors and their exit codes, and a real
//! federation (nodes and coordinator started as `phm node` / `phm coordinator`) for
//! answered, refused, budget and audit-verify paths, and the one-command demo.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SQL: &str = "SELECT sex, COUNT(*) AS people FROM gp_patients GROUP BY sex";

fn phm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_phm"))
}

fn run(args: &[&str]) -> Output {
    phm().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn key_file(dir: &Path) -> PathBuf {
    let key = dir.join("dsu.key");
    let out = run(&["keys", "new", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    key
}

#[test]
fn bad_sql_shows_a_caret_and_exits_2() {
    let out = run(&[
        "query",
        "--federation",
        "synthetic-ics",
        "--coordinator",
        "https://127.0.0.1:1",
        "--key",
        "/nonexistent/dsu.key",
        "--purpose",
        "planning",
        "SELECT sex, COUNT(*) AS people FROM gp_patients GROUP BY sex ORDER BY sex",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains('^'), "{err}");
    assert!(err.contains("ORDER BY") || err.contains("ORDER"), "{err}");
    // The SQL is checked before anything else, so the missing key is not mentioned.
    assert!(!err.contains("nonexistent"), "{err}");
}

#[test]
fn bad_or_missing_key_file_is_named_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.key");
    std::fs::write(&broken, "-----BEGIN PRIVATE KEY-----\nnot base64\n").unwrap();
    for key in [broken.clone(), dir.path().join("missing.key")] {
        let out = run(&[
            "query",
            "--federation",
            "synthetic-ics",
            "--coordinator",
            "https://127.0.0.1:1",
            "--key",
            key.to_str().unwrap(),
            "--purpose",
            "planning",
            SQL,
        ]);
        assert_eq!(out.status.code(), Some(2));
        let err = text(&out.stderr);
        assert!(
            err.contains(key.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
}

#[test]
fn unreachable_coordinator_exits_3_with_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let certs = dir.path().join("certs");
    let out = run(&[
        "certs",
        "dev",
        "--out",
        certs.to_str().unwrap(),
        "--names",
        "dsu-client",
    ]);
    assert!(out.status.success());
    let url = format!("https://127.0.0.1:{}", free_port());
    let out = run(&[
        "query",
        "--federation",
        "synthetic-ics",
        "--coordinator",
        &url,
        "--ca",
        certs.join("ca.pem").to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--purpose",
        "planning",
        SQL,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach coordinator at {url}")),
        "{err}"
    );
    // Budget uses the same path.
    let out = run(&[
        "budget",
        "--federation",
        "synthetic-ics",
        "--coordinator",
        &url,
        "--ca",
        certs.join("ca.pem").to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

/// Child processes that are stopped (SIGTERM, then kill) when the test ends.
struct Federation {
    dir: PathBuf,
    children: Vec<Child>,
    coordinator: String,
}

impl Federation {
    fn start(dir: &Path) -> Federation {
        let out = run(&[
            "synth",
            "--out",
            dir.to_str().unwrap(),
            "--population",
            "4000",
            "--seed",
            "3",
            "--nodes-limit",
            "2",
            "--quiet",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut manifest = phm::synth::load_manifest(dir).unwrap();
        let ports: Vec<u16> = (0..=manifest.organisations.len())
            .map(|_| free_port())
            .collect();
        phm::synth::write_configs(dir, &mut manifest, ports[0], &ports[1..]).unwrap();
        let mut children = Vec::new();
        let mut spawn = |role: &str, config: PathBuf, log: &str| {
            let log = std::fs::File::create(dir.join(log)).unwrap();
            children.push(
                phm()
                    .args([role, "--config", config.to_str().unwrap()])
                    .stdout(Stdio::from(log.try_clone().unwrap()))
                    .stderr(Stdio::from(log))
                    .spawn()
                    .unwrap(),
            );
        };
        for org in &manifest.organisations {
            spawn(
                "node",
                dir.join(&org.ods_code).join("node.toml"),
                &format!("{}.log", org.ods_code),
            );
        }
        spawn(
            "coordinator",
            dir.join("coordinator/coordinator.toml"),
            "coordinator.log",
        );
        // Nodes open their port only once data and policy are loaded.
        let deadline = Instant::now() + Duration::from_secs(120);
        for port in &ports {
            while TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "port {port} never opened; logs in {}",
                    dir.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Federation {
            dir: dir.to_path_buf(),
            children,
            coordinator: format!("https://127.0.0.1:{}", ports[0]),
        }
    }

    fn args(&self, who: &str) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "--federation".into(),
            "synthetic-ics".into(),
            "--coordinator".into(),
            self.coordinator.clone(),
            "--ca".into(),
            format!("{d}/certs/ca.pem"),
            "--cert".into(),
            format!("{d}/certs/{who}-client.pem"),
            "--cert-key".into(),
            format!("{d}/certs/{who}-client.key"),
            "--key".into(),
            format!("{d}/keys/{who}.key"),
        ]
    }

    fn query(&self, who: &str, extra: &[&str], sql: &str) -> Output {
        let mut args = vec!["query".to_string()];
        args.extend(self.args(who));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(sql.to_string());
        phm().args(&args).output().unwrap()
    }

    fn stop(&mut self) {
        for c in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn real_federation_answers_refuses_reports_budget_and_audits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ics");
    let mut fed = Federation::start(&dir);

    // Answered, as JSON: exactly one object with the contracted fields.
    let out = fed.query(
        "dsu",
        &[
            "--purpose",
            "planning",
            "--format",
            "json",
            "--query-id",
            "t-1",
        ],
        SQL,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["query_id"], "t-1");
    assert_eq!(v["dataset"], "gp_patients");
    assert_eq!(v["total_kind"], "distinct_people");
    assert_eq!(v["coverage"]["answered"].as_array().unwrap().len(), 2);
    assert_eq!(v["epsilon_spent"], 0.5);
    let rows = v["rows"].as_array().unwrap();
    let female = rows
        .iter()
        .find(|r| r["group"]["sex"] == "F")
        .expect("a row for F");
    let people = &female["values"]["people"];
    let (lo, hi) = (
        people["ci95"][0].as_f64().unwrap(),
        people["ci95"][1].as_f64().unwrap(),
    );
    let est = people["estimate"].as_f64().unwrap();
    assert!(lo <= est && est <= hi && est > 100.0, "{people}");

    // The same question with the same id again (the CLI re-signs it with a fresh
    // nonce and time) returns the stored answer, as README promises; the same id for
    // another question is refused.
    let again = fed.query(
        "dsu",
        &[
            "--purpose",
            "planning",
            "--format",
            "json",
            "--query-id",
            "t-1",
        ],
        SQL,
    );
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again, v, "a retry by id returns the stored answer");
    let other = fed.query(
        "dsu",
        &[
            "--purpose",
            "planning",
            "--format",
            "json",
            "--query-id",
            "t-1",
        ],
        "SELECT COUNT(*) AS people FROM gp_patients",
    );
    assert_eq!(other.status.code(), Some(4), "{}", text(&other.stderr));
    assert!(text(&other.stderr).contains("QUERY_ID_REUSED"));

    // CSV: a header and one line per group.
    let out = fed.query("dsu", &["--purpose", "planning", "--format", "csv"], SQL);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let csv = text(&out.stdout);
    assert!(
        csv.starts_with("sex,people,people_ci95_low,people_ci95_high,people_suppressed\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 4, "{csv}");

    // Table, for the research project.
    let out = fed.query(
        "researcher",
        &["--purpose", "research", "--project", "RP-2026-014", "--epsilon", "1"],
        "SELECT imd_quintile, AVG(hba1c) AS mean_hba1c FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("mean_hba1c (95% CI)"), "{table}");
    assert!(table.contains("2 of 2 partners answered"), "{table}");

    // Refused by the council's policy: exit 4 with the reason name and sentence.
    let out = fed.query(
        "dsu",
        &["--purpose", "planning"],
        "SELECT housing_tenure, COUNT(*) AS residents FROM la_residents GROUP BY housing_tenure",
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("POLICY_DENIED"), "{err}");
    assert!(err.contains("housing_tenure"), "{err}");

    // Budget: every partner reports the DSU's ledger, with the spend above.
    let mut args = vec!["budget".to_string()];
    args.extend(fed.args("dsu"));
    let out = phm().args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let budget = text(&out.stdout);
    assert!(budget.contains("requester:dsu"), "{budget}");
    assert!(budget.contains("Riverside Borough Council"), "{budget}");

    // Audit: stop the nodes (flushes the log), verify, then tamper and verify again.
    fed.stop();
    let manifest = phm::synth::load_manifest(&dir).unwrap();
    let gp = &manifest.organisations[0].ods_code;
    let state = dir.join(gp).join("state");
    let out = run(&["audit", "verify", "--data-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ok = text(&out.stdout);
    assert!(
        ok.starts_with("ok: ") && ok.contains("chain intact"),
        "{ok}"
    );

    let log = state.join("audit.log");
    let content = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = content.lines().map(str::to_string).collect();
    assert!(lines.len() >= 2, "{content}");
    let mut entry: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    let obj = entry.as_object_mut().unwrap();
    let field = obj
        .keys()
        .find(|k| !["hash", "prev_hash", "seq"].contains(&k.as_str()))
        .unwrap()
        .clone();
    obj.insert(field, serde_json::json!("tampered"));
    lines[1] = entry.to_string();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = run(&["audit", "verify", "--data-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("entry 2"), "{err}");
}

#[test]
fn demo_runs_end_to_end_and_checks_its_reference_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = run(&[
        "demo",
        "--population",
        "6000",
        "--nodes",
        "2",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    for expected in [
        "1. Diabetes prevalence",
        "2 of 2 partners answered",
        "Riverside Borough Council (LA801) refused: POLICY_DENIED",
        "reference figures inside their 95% interval",
        "Stopped 7 processes cleanly",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // Children's logs went to DIR/logs.
    assert!(dir.join("logs/coordinator.log").exists());
    assert!(dir.join("logs/LA801.log").exists());
}

#[test]
fn demo_keep_running_prints_a_query_line_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut child = phm()
        .args([
            "demo",
            "--population",
            "3000",
            "--nodes",
            "1",
            "--keep-running",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut query_line = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line
            .trim_start()
            .contains(" query --coordinator https://127.0.0.1:")
        {
            query_line = Some(line.clone());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let query_line = query_line.expect("the demo prints a phm query line to try");
    assert!(query_line.contains("--key") && query_line.contains("dsu.key"));
    assert!(
        query_line.contains("--federation synthetic-ics"),
        "the line signs for the demo's federation: {query_line}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Bounded: a demo that misses the signal must fail this test, not hang CI.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = tx.send((rest, child.wait()));
    });
    let Ok((rest, exit)) = rx.recv_timeout(std::time::Duration::from_secs(120)) else {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        panic!("the demo did not stop within 120 s of SIGTERM");
    };
    let exit = exit.unwrap();
    assert_eq!(exit.code(), Some(0), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("Stopped 6 processes cleanly")),
        "{rest:?}"
    );
}

/// Run `phm` with its stdout a pipe whose reader has already gone, as in
/// `phm … | head` once head has exited: every write gets EPIPE.
fn run_with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    phm()
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_closed_stdout_is_a_normal_end(what: &str, out: &Output, code: i32) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: a closed stdout must end the command normally (exit {code}), got {:?}:\n{err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!err.contains("Broken pipe"), "{what}: {err}");
}

#[test]
fn closed_stdout_is_a_normal_end_for_commands_that_print() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/samples/gp_practice.toml"
    );
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("policy schema", vec!["policy".into(), "schema".into()]),
        (
            "policy check",
            vec!["policy".into(), "check".into(), sample.into()],
        ),
        (
            "keys new",
            vec!["keys".into(), "new".into(), "--out".into(), d("k.key")],
        ),
        (
            "certs dev",
            vec![
                "certs".into(),
                "dev".into(),
                "--out".into(),
                d("certs"),
                "--servers".into(),
                "A81001".into(),
                "--clients".into(),
                "coordinator-client".into(),
                "--people".into(),
                "dsu-client".into(),
            ],
        ),
        (
            "synth",
            vec![
                "synth".into(),
                "--out".into(),
                d("ics"),
                "--population".into(),
                "1000".into(),
                "--nodes-limit".into(),
                "1".into(),
                "--quiet".into(),
            ],
        ),
        ("--help", vec!["--help".into()]),
    ];
    for (what, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_with_closed_stdout(&args);
        assert_closed_stdout_is_a_normal_end(what, &out, 0);
    }
    // The work was still done.
    assert!(dir.path().join("k.key").exists());
    assert!(dir.path().join("certs/people-ca.pem").exists());
    assert!(dir.path().join("ics/ics.json").exists());
}

#[test]
fn queries_into_a_closed_pipe_end_normally_and_refusals_print_without_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ics");
    let mut fed = Federation::start(&dir);

    for format in ["table", "csv", "json"] {
        let mut args = vec!["query".to_string()];
        args.extend(fed.args("dsu"));
        args.extend(["--purpose", "planning", "--format", format, SQL].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_with_closed_stdout(&args);
        assert_closed_stdout_is_a_normal_end(&format!("query --format {format}"), &out, 0);
    }
    let mut args = vec!["budget".to_string()];
    args.extend(fed.args("dsu"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_closed_stdout_is_a_normal_end("budget", &run_with_closed_stdout(&args), 0);

    // Every partner asked (only the council holds la_residents) refuses: the table
    // format prints the refusals alone, no empty table header above them.
    let out = fed.query(
        "dsu",
        &["--purpose", "planning"],
        "SELECT housing_tenure, COUNT(*) AS residents FROM la_residents GROUP BY housing_tenure",
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(!shown.contains("(95% CI)"), "{shown}");
    assert!(!shown.contains("---"), "{shown}");
    assert!(!shown.contains("la_residents — query"), "{shown}");
    assert!(!shown.contains("Privacy budget spent"), "{shown}");
    assert!(shown.starts_with("0 of 1 partner answered"), "{shown}");
    assert!(
        shown.contains("refused: POLICY_DENIED") && shown.contains("housing_tenure"),
        "{shown}"
    );

    // audit verify prints too.
    fed.stop();
    let manifest = phm::synth::load_manifest(&dir).unwrap();
    let state = dir.join(&manifest.organisations[0].ods_code).join("state");
    let out = run_with_closed_stdout(&["audit", "verify", "--data-dir", state.to_str().unwrap()]);
    assert_closed_stdout_is_a_normal_end("audit verify", &out, 0);
}

#[test]
fn query_without_a_client_certificate_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    // A CA file with no <requester>-client.pem beside it, so no default applies.
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = run(&[
        "query",
        "--federation",
        "synthetic-ics",
        "--coordinator",
        &format!("https://127.0.0.1:{}", free_port()),
        "--ca",
        ca.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--purpose",
        "planning",
        SQL,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("requires a client certificate") && err.contains("--cert"),
        "{err}"
    );
}

/// Rate arguments the rate table would refuse are refused before either query is sent
/// (so nothing is spent): here the coordinator's address is unreachable, and exit 2
/// (bad input) rather than 3 shows no connection was tried.
#[test]
fn bad_rate_arguments_are_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("missing.key");
    let people = "SELECT imd_quintile, COUNT(*) AS people FROM gp_patients GROUP BY imd_quintile";
    let by_sex = "SELECT sex, COUNT(*) AS people FROM gp_patients GROUP BY sex";
    for (extra, want) in [
        (
            vec!["--rate-per", "0", "--denominator", by_sex],
            "--rate-per must be",
        ),
        (
            vec!["--rate-per", "1000", "--denominator", people],
            "same GROUP BY",
        ),
        (
            vec![
                "--rate-per",
                "1000",
                "--denominator",
                by_sex,
                "--standardise",
                "bin(age, 5)",
            ],
            "no such group column",
        ),
    ] {
        let mut args = vec![
            "query",
            "--federation",
            "synthetic-ics",
            "--coordinator",
            "https://127.0.0.1:1",
            "--key",
            key.to_str().unwrap(),
            "--purpose",
            "planning",
        ];
        args.extend(extra);
        args.push(SQL);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(want), "{}", text(&out.stderr));
    }
}
