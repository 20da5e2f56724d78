//! Node identities and the node registry (the scheme linked and secure queries share):
//! `phm keys new --kind node` and `phm registry sign|verify` as an IG lead runs them,
//! and a node that refuses to start when its registry is not signed by the key its
//! policy pins, does not list it, or its identity file is readable by others.

use phm_e2e::{Ics, bins, phm, spawn};
use std::path::Path;
use std::time::Duration;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Start the node of `ics/<id>` and return its exit code and log: it must not start.
fn start_refused(ics: &Ics, id: &str) -> (Option<i32>, String) {
    let config = ics.node_config(id);
    let mut p = spawn(
        id,
        &bins().node,
        &["--config", &s(&config)],
        ics.root.join(format!("{id}-refused.log")),
    );
    let code = p.wait_exit(Duration::from_secs(60));
    let log = p.log_text();
    assert!(code.is_some(), "node {id} started anyway; its log:\n{log}");
    (code.flatten(), log)
}

#[test]
fn a_registry_signed_by_another_key_or_an_exposed_identity_stops_the_node_at_start() {
    let ics = Ics::synth(20_000, 51);
    let id = "RW2";
    let peer = ics.root.join("peer");
    let tmp = ics.root.join("stranger");
    std::fs::create_dir_all(&tmp).unwrap();

    // The IG lead's tools: a registry signed by a key no policy pins.
    let key = tmp.join("stranger.key");
    let (code, _, err) = phm(&["keys", "new", "--out", &s(&key)]);
    assert_eq!(code, 0, "{err}");
    let forged = tmp.join("registry.toml");
    let nodes: Vec<String> = std::fs::read_dir(&peer)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".identity.pub"))
        .map(|p| s(&p))
        .collect();
    assert!(nodes.len() > 3, "synth wrote no node identities");
    let (key_s, forged_s) = (s(&key), s(&forged));
    let mut args = vec![
        "registry",
        "sign",
        "--federation",
        phm_e2e::FEDERATION_ID,
        "--key",
        &key_s,
        "--out",
        &forged_s,
    ];
    for n in &nodes {
        args.push("--node");
        args.push(n);
    }
    let (code, stranger_key, err) = phm(&args);
    assert_eq!(code, 0, "{err}");
    // The synthetic registry verifies under the pinned key, and the forged one does not.
    let pinned = std::fs::read_to_string(ics.root.join("keys/registry-signer.key.pub"))
        .unwrap()
        .trim()
        .to_string();
    let (code, out, err) = phm(&[
        "registry",
        "verify",
        "--registry",
        &s(&peer.join("registry.toml")),
        "--registry-key",
        &pinned,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(id), "{out}");
    let (code, _, err) = phm(&[
        "registry",
        "verify",
        "--registry",
        &forged_s,
        "--registry-key",
        &pinned,
    ]);
    assert_ne!(code, 0, "a registry signed by another key verified: {err}");
    assert_ne!(stranger_key.trim(), pinned);

    // The node, pointed at the forged registry, does not start, and says why.
    let genuine = std::fs::read(peer.join("registry.toml")).unwrap();
    std::fs::copy(&forged, peer.join("registry.toml")).unwrap();
    let (code, log) = start_refused(&ics, id);
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("registry_key") && log.contains("does not verify"),
        "the node must say the registry is not signed by the pinned key:\n{log}"
    );
    std::fs::write(peer.join("registry.toml"), genuine).unwrap();

    // An identity file others can read: refused, with the fix.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let identity = peer.join(format!("{id}.identity"));
        std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, log) = start_refused(&ics, id);
        assert_ne!(code, Some(0), "{log}");
        assert!(log.contains("chmod 600"), "{log}");
    }
}
