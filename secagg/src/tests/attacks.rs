//! A scripted malicious coordinator: every attack is refused with a typed error, and no
//! node ever produces unmasking shares for it.

use super::*;
use crate::client::{AwaitingSurvivors, AwaitingUnmask};
use crate::participation::admit_session;
use crate::{ForwardedShares, PeerKeys, SurvivorSet, UnmaskRequest};

const N: usize = 5;

/// An honest session of N = 5 nodes (t_noise = 4, t_sss = 4) up to the survivor set, for the
/// attacks on R3 and R4: every node's state after R2, and the honest U3.
fn to_r3(fed: &Fed, nonce: u8) -> (Vec<AwaitingSurvivors>, SurvivorSet, Begin) {
    to_r3_without(fed, nonce, &[])
}

/// As [`to_r3`], but the nodes in `silent` send their keys and then nothing more: they are
/// in U1 and outside U2, and only the others' states are returned (in node order).
fn to_r3_without(
    fed: &Fed,
    nonce: u8,
    silent: &[usize],
) -> (Vec<AwaitingSurvivors>, SurvivorSet, Begin) {
    let begin = begin_msg(fed, params(fed.ids.len() as u32, 4, 1), "q", nonce);
    let policy = policy(fed, &begin.params);
    let mut server = Server::new(&begin, &fed.registry_key.verifying_key(), NOW).unwrap();
    let (s0, keys, parts) = r0(fed, &begin, &policy);
    for (id, k) in fed.ids.iter().zip(keys) {
        server.receive_keys(id.node_id(), k).unwrap();
    }
    let pk = server.close_keys().unwrap();
    let mut s1 = Vec::new();
    for (i, s) in s0.into_iter().enumerate() {
        if silent.contains(&i) {
            continue;
        }
        let (s, msg) = s.share_keys(&pk, &mut rng(i as u64)).unwrap();
        server.receive_shares(fed.ids[i].node_id(), msg).unwrap();
        s1.push((i, s));
    }
    let fwd = server.close_shares().unwrap();
    let mut s2 = Vec::new();
    for (i, s) in s1 {
        let ready = s.receive_shares(&fwd[fed.ids[i].node_id()]).unwrap();
        let c = ready
            .commit(Some(&parts[i]), |_| Ok::<_, SecAggError>(()))
            .unwrap();
        let (s, y) = c.mask(&[i as i64]).unwrap();
        server.receive_masked(fed.ids[i].node_id(), y).unwrap();
        s2.push(s);
    }
    (s2, server.close_masked().unwrap(), begin)
}

fn ids(fed: &Fed, ix: &[usize]) -> Vec<NodeId> {
    ix.iter().map(|&i| fed.ids[i].node_id().clone()).collect()
}

#[test]
fn unsigned_foreign_or_altered_registries_are_refused() {
    let fed = fed(N);
    let p = params(N as u32, 4, 1);
    let policy = policy(&fed, &p);
    let me = &fed.ids[0];
    let try_begin = |b: &Begin| {
        client::begin(me, &policy, b, NOW, None, &mut rng(1))
            .err()
            .unwrap()
    };

    let mut b = begin_msg(&fed, p.clone(), "q", 1);
    b.registry = Registry::new("phm-test", 1, u64::MAX, fed.registry.nodes.clone());
    assert_eq!(
        try_begin(&b),
        SecAggError::Relay(phm_relay::RelayError::RegistryUnsigned)
    );

    // Signed by the coordinator's own key instead of the IG leads'.
    let mut foreign = Registry::new("phm-test", 1, u64::MAX, fed.registry.nodes.clone());
    foreign.sign(&SigningKey::from_bytes(&[43; 32])).unwrap();
    b.registry = foreign;
    assert_eq!(
        try_begin(&b),
        SecAggError::Relay(phm_relay::RelayError::RegistrySignature)
    );

    // A sybil added after signing.
    let mut altered = fed.registry.clone();
    let sybil = NodeIdentity::generate(NodeId::new("SYBIL").unwrap()).unwrap();
    altered.nodes.push(RegistryEntry {
        node: sybil.public().clone(),
        valid_from_ms: 0,
        valid_until_ms: u64::MAX,
    });
    b.registry = altered;
    assert_eq!(
        try_begin(&b),
        SecAggError::Relay(phm_relay::RelayError::RegistrySignature)
    );

    // A cohort member the registry does not list.
    let mut b = begin_msg(&fed, p.clone(), "q", 1);
    b.cohort[4] = NodeId::new("SYBIL").unwrap();
    assert!(matches!(
        try_begin(&b),
        SecAggError::Relay(phm_relay::RelayError::NotInRegistry(_))
    ));
    // The server side refuses the same registries.
    let mut b = begin_msg(&fed, p, "q", 1);
    b.registry = Registry::new("phm-test", 1, u64::MAX, fed.registry.nodes.clone());
    assert!(Server::new(&b, &fed.registry_key.verifying_key(), NOW).is_err());
}

#[test]
fn parameters_below_the_node_policy_are_refused() {
    let fed = fed(N);
    let good = params(N as u32, 4, 1);
    let policy = policy(&fed, &good);
    let me = &fed.ids[0];
    let refuse = |p: SessionParams| {
        let b = begin_msg(&fed, p, "q", 1);
        client::begin(me, &policy, &b, NOW, None, &mut rng(1))
            .err()
            .unwrap()
    };
    // t_sss ≤ (N + c)/2: two disjoint signer sets could then exist.
    assert!(matches!(
        refuse(SessionParams {
            t_sss: 2,
            ..good.clone()
        }),
        SecAggError::BadParams(_)
    ));
    // σ below what this node's ρ needs (a "downgrade" to less noise).
    assert!(matches!(
        refuse(SessionParams {
            sigma_share: good.sigma_share * 0.9,
            ..good.clone()
        }),
        SecAggError::NoiseTooSmall { .. }
    ));
    assert!(matches!(
        refuse(SessionParams {
            sigma_share: 0.3,
            lattice: 1,
            ..good.clone()
        }),
        SecAggError::SigmaTooSmall(_)
    ));
    assert!(matches!(
        refuse(SessionParams {
            layout_digest: [8; 32],
            ..good.clone()
        }),
        SecAggError::BadParams(_)
    ));
    // Announced N differs from the cohort.
    assert!(matches!(
        refuse(SessionParams {
            n: 6,
            ..good.clone()
        }),
        SecAggError::BadParams(_)
    ));
    // Policy floors: min_cohort and min_survivors.
    let strict = NodePolicy {
        min_cohort: 10,
        ..policy.clone()
    };
    let b = begin_msg(&fed, good.clone(), "q", 1);
    assert!(matches!(
        client::begin(me, &strict, &b, NOW, None, &mut rng(1)),
        Err(SecAggError::BadParams(_))
    ));
    let strict = NodePolicy {
        min_survivors: 0.9,
        ..policy.clone()
    };
    assert!(matches!(
        client::begin(me, &strict, &b, NOW, None, &mut rng(1)),
        Err(SecAggError::BadParams(_))
    ));
}

#[test]
fn substituted_keys_are_refused() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let attacker = crate::crypto::keypair(&mut rng(99)).1;

    let (s0, keys, _) = r0(&fed, &begin, &policy);
    let mut s0 = s0.into_iter();
    let node0 = s0.next().unwrap();
    // The coordinator swaps node 1's mask key for its own (so it could compute s_01).
    let mut k = keys.clone();
    k[1].s_pk = attacker;
    let err = node0
        .share_keys(&PeerKeys { keys: k }, &mut rng(1))
        .err()
        .unwrap();
    assert_eq!(err, SecAggError::KeySignature(fed.ids[1].node_id().clone()));

    // Or swaps node 1's own keys in the list sent to node 1.
    let node1 = s0.next().unwrap();
    let mut k = keys.clone();
    k[1].c_pk = attacker;
    assert_eq!(
        node1
            .share_keys(&PeerKeys { keys: k }, &mut rng(1))
            .err()
            .unwrap(),
        SecAggError::OwnKeysSubstituted
    );

    // Reflects node 2's key as node 3's (signature copied too).
    let node2 = s0.next().unwrap();
    let mut k = keys.clone();
    k[3].c_pk = k[2].c_pk;
    k[3].s_pk = k[2].s_pk;
    k[3].signature = k[2].signature;
    assert!(
        node2
            .share_keys(&PeerKeys { keys: k }, &mut rng(1))
            .is_err()
    );

    // Replays an advertisement twice.
    let node3 = s0.next().unwrap();
    let mut k = keys.clone();
    k.push(k[0].clone());
    assert!(matches!(
        node3.share_keys(&PeerKeys { keys: k }, &mut rng(1)),
        Err(SecAggError::Duplicate { .. })
    ));

    // Exactly t_noise keys (node 0 left out) is still a session; none at all is not.
    let node4 = s0.next().unwrap();
    assert!(
        node4
            .share_keys(
                &PeerKeys {
                    keys: keys[1..].to_vec()
                },
                &mut rng(1)
            )
            .is_ok()
    );
    let (mut again, _, _) = r0(
        &fed,
        &begin_msg(&fed, params(N as u32, 4, 1), "q", 9),
        &policy,
    );
    let node = again.remove(4);
    assert!(matches!(
        node.share_keys(&PeerKeys { keys: vec![] }, &mut rng(1)),
        Err(SecAggError::Protocol { .. })
    ));
}

#[test]
fn messages_spliced_from_another_session_are_refused() {
    let fed = fed(N);
    let p = params(N as u32, 4, 1);
    let policy = policy(&fed, &p);
    let b1 = begin_msg(&fed, p.clone(), "q", 1);
    let b2 = begin_msg(&fed, p, "q", 2);
    let (s1, k1, _) = r0(&fed, &b1, &policy);
    let (s2, k2, _) = r0(&fed, &b2, &policy);
    // Node 1's keys from session 2 spliced into session 1.
    let mut k = k1.clone();
    k[1] = k2[1].clone();
    let mut s1 = s1.into_iter();
    let n0 = s1.next().unwrap();
    assert_eq!(
        n0.share_keys(&PeerKeys { keys: k }, &mut rng(1))
            .err()
            .unwrap(),
        SecAggError::KeySignature(fed.ids[1].node_id().clone())
    );
    // Share ciphertexts of session 2 forwarded in session 1.
    let n1 = s1.next().unwrap();
    let (n1, _) = n1
        .share_keys(&PeerKeys { keys: k1.clone() }, &mut rng(2))
        .unwrap();
    let mut s2 = s2.into_iter();
    let m0 = s2.next().unwrap();
    let (_, out) = m0.share_keys(&PeerKeys { keys: k2 }, &mut rng(3)).unwrap();
    let to_n1 = out
        .shares
        .into_iter()
        .filter(|e| e.to == *fed.ids[1].node_id())
        .collect();
    let err = n1
        .receive_shares(&ForwardedShares { shares: to_n1 })
        .err()
        .unwrap();
    assert_eq!(err, SecAggError::ShareDecrypt(fed.ids[0].node_id().clone()));
    // And the survivor signatures of one session are worthless in another.
    let (states_a, u3_a, _) = to_r3(&fed, 3);
    let (states_b, u3_b, _) = to_r3(&fed, 4);
    let sigs_b: Vec<_> = states_b
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.consistency(&fed.ids[i], &u3_b).unwrap().1)
        .collect();
    let a0 = states_a.into_iter().next().unwrap();
    let (a0, _) = a0.consistency(&fed.ids[0], &u3_a).unwrap();
    assert!(matches!(
        a0.unmask(&UnmaskRequest { signatures: sigs_b }),
        Err(SecAggError::InconsistentSurvivorSet(_))
    ));
}

#[test]
fn a_reflected_share_ciphertext_is_refused() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let (s0, keys, _) = r0(&fed, &begin, &policy);
    let n0 = s0.into_iter().next().unwrap();
    let (n0, out) = n0.share_keys(&PeerKeys { keys }, &mut rng(1)).unwrap();
    // Its own ciphertext for node 1, sent back to it as if from node 1.
    let mut e = out.shares[0].clone();
    e.from = e.to.clone();
    e.to = fed.ids[0].node_id().clone();
    assert_eq!(
        n0.receive_shares(&ForwardedShares { shares: vec![e] })
            .err()
            .unwrap(),
        SecAggError::ShareDecrypt(fed.ids[1].node_id().clone())
    );
}

#[test]
fn a_second_session_for_the_same_query_is_refused() {
    let fed = fed(N);
    let p = params(N as u32, 4, 1);
    let policy = policy(&fed, &p);
    let me = &fed.ids[0];
    let (_, _, part) = client::begin(
        me,
        &policy,
        &begin_msg(&fed, p.clone(), "q", 1),
        NOW,
        None,
        &mut rng(1),
    )
    .unwrap();
    // The coordinator "aborts" and starts again for the same query with a new nonce.
    let again = begin_msg(&fed, p.clone(), "q", 2);
    assert!(matches!(
        client::begin(me, &policy, &again, NOW, Some(&part), &mut rng(2)),
        Err(SecAggError::AlreadyJoined { .. })
    ));
    // Or replays the very same Begin.
    let same = begin_msg(&fed, p, "q", 1);
    assert!(matches!(
        client::begin(me, &policy, &same, NOW, Some(&part), &mut rng(3)),
        Err(SecAggError::AlreadyJoined { .. })
    ));
    assert!(admit_session(None, "other query", &[0; 32]).is_ok());
}

#[test]
fn a_survivor_outside_u2_is_refused_before_any_signature() {
    // Node 4 sent keys and then went quiet, so no survivor holds shares of its masks. A
    // coordinator that names it a survivor anyway would have the others unmask a sum
    // whose mask with node 4 nobody can remove, or learn which shares they hold.
    let fed = fed(N + 1);
    let (states, u3, _) = to_r3_without(&fed, 1, &[N]);
    assert_eq!(u3.survivors, ids(&fed, &[0, 1, 2, 3, 4]));
    let padded = SurvivorSet {
        survivors: ids(&fed, &[0, 1, 2, 3, 4, 5]),
    };
    assert_eq!(states.len(), N);
    for (i, s) in states.into_iter().enumerate() {
        assert_eq!(
            s.consistency(&fed.ids[i], &padded).err().unwrap(),
            SecAggError::SurvivorNotInU2(fed.ids[N].node_id().clone())
        );
    }
}

#[test]
fn a_short_survivor_set_is_refused_by_every_node_before_any_share() {
    let fed = fed(N);
    let (states, u3, _) = to_r3(&fed, 1);
    assert_eq!(u3.survivors.len(), N);
    let short = SurvivorSet {
        survivors: ids(&fed, &[0, 1, 2]),
    };
    for (i, s) in states.into_iter().enumerate() {
        let err = s.consistency(&fed.ids[i], &short).err().unwrap();
        if i < 3 {
            assert_eq!(
                err,
                SecAggError::TooFewSurvivors {
                    round: Round::Consistency,
                    have: 3,
                    need: 4
                }
            );
        } else {
            assert_eq!(err, SecAggError::SelfNotInU3);
        }
    }
}

#[test]
fn the_server_refuses_to_unmask_a_short_sum() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let mut server = Server::new(&begin, &fed.registry_key.verifying_key(), NOW).unwrap();
    let (s0, keys, parts) = r0(&fed, &begin, &policy);
    for (id, k) in fed.ids.iter().zip(keys) {
        server.receive_keys(id.node_id(), k).unwrap();
    }
    let pk = server.close_keys().unwrap();
    let mut s1 = Vec::new();
    for (i, s) in s0.into_iter().enumerate() {
        let (s, m) = s.share_keys(&pk, &mut rng(i as u64)).unwrap();
        server.receive_shares(fed.ids[i].node_id(), m).unwrap();
        s1.push(s);
    }
    let fwd = server.close_shares().unwrap();
    for (i, s) in s1.into_iter().enumerate().take(3) {
        let c = s
            .receive_shares(&fwd[fed.ids[i].node_id()])
            .unwrap()
            .commit(Some(&parts[i]), |_| Ok::<_, SecAggError>(()))
            .unwrap();
        server
            .receive_masked(fed.ids[i].node_id(), c.mask(&[1]).unwrap().1)
            .unwrap();
    }
    assert_eq!(
        server.close_masked().err().unwrap(),
        SecAggError::TooFewSurvivors {
            round: Round::MaskedInput,
            have: 3,
            need: 4
        }
    );
    // And stays refused: the session cannot move on to the unmasking round.
    assert!(matches!(
        server.close_signatures(),
        Err(SecAggError::Protocol { .. })
    ));
}

#[test]
fn too_few_forwarded_shares_stop_before_the_spend() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let (s0, keys, _) = r0(&fed, &begin, &policy);
    let n0 = s0.into_iter().next().unwrap();
    let (n0, _) = n0.share_keys(&PeerKeys { keys }, &mut rng(1)).unwrap();
    // Nothing forwarded: |U2| = 1 < t_noise; receive_shares fails, so no ReadyToCommit
    // exists and the spend callback can never run.
    assert_eq!(
        n0.receive_shares(&ForwardedShares { shares: vec![] })
            .err()
            .unwrap(),
        SecAggError::TooFewSurvivors {
            round: Round::MaskedInput,
            have: 1,
            need: 4
        }
    );
}

#[test]
fn a_failed_spend_means_no_masked_input() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let mut server = Server::new(&begin, &fed.registry_key.verifying_key(), NOW).unwrap();
    let (s0, keys, parts) = r0(&fed, &begin, &policy);
    for (id, k) in fed.ids.iter().zip(keys) {
        server.receive_keys(id.node_id(), k).unwrap();
    }
    let pk = server.close_keys().unwrap();
    let mut s1 = Vec::new();
    for (i, s) in s0.into_iter().enumerate() {
        let (s, m) = s.share_keys(&pk, &mut rng(i as u64)).unwrap();
        server.receive_shares(fed.ids[i].node_id(), m).unwrap();
        s1.push(s);
    }
    let fwd = server.close_shares().unwrap();
    let ready = s1
        .remove(0)
        .receive_shares(&fwd[fed.ids[0].node_id()])
        .unwrap();
    let intent = ready.spend_intent(Some(&parts[0])).unwrap();
    assert_eq!((intent.n, intent.u2, intent.t_noise), (5, 5, 4));
    assert!(intent.rho_local > RHO);
    let failed = ready.commit(Some(&parts[0]), |_| {
        Err(SecAggError::Rng("disk full".into()))
    });
    assert!(failed.is_err());
    // A spend recorded for another session is no licence for this one.
    let ready = s1
        .remove(0)
        .receive_shares(&fwd[fed.ids[1].node_id()])
        .unwrap();
    let other = Participation {
        session_id: [0; 32],
        ..parts[1].clone()
    };
    assert!(matches!(
        ready.commit(Some(&other), |_| Ok::<_, SecAggError>(())),
        Err(SecAggError::AlreadyJoined { .. })
    ));
}

/// The attack the consistency round exists for: tell nodes 0–2 (and 4) that everyone
/// survived, tell node 3 that node 4 dropped, and collect b-shares of 4 from the first
/// group and s-shares of 4 from node 3, which together would unmask y_4.
#[test]
fn inconsistent_survivor_sets_get_no_shares() {
    let fed = fed(N);
    let (states, u3, _) = to_r3(&fed, 1);
    let u3_minus_4 = SurvivorSet {
        survivors: ids(&fed, &[0, 1, 2, 3]),
    };
    let mut waiting: Vec<AwaitingUnmask> = Vec::new();
    let mut sigs = Vec::new();
    for (i, s) in states.into_iter().enumerate() {
        let set = if i == 3 { &u3_minus_4 } else { &u3 };
        let (s, sig) = s.consistency(&fed.ids[i], set).unwrap();
        waiting.push(s);
        sigs.push(sig);
    }
    let node3 = waiting.remove(3);
    assert_eq!(node3.survivors().len(), 4);
    // Everyone's signatures: node 4's is from outside the set node 3 signed (refused
    // before any signature is checked, since signatures are checked as one batch).
    let err = node3
        .unmask(&UnmaskRequest {
            signatures: sigs.clone(),
        })
        .err()
        .unwrap();
    assert!(
        matches!(err, SecAggError::NotAMember { set: "U3", .. }),
        "{err:?}"
    );
    // Node 4 (told everyone survived) sees node 3's signature on another set, and names it.
    let node4 = waiting.remove(3);
    let err = node4
        .unmask(&UnmaskRequest {
            signatures: sigs.clone(),
        })
        .err()
        .unwrap();
    assert_eq!(
        err,
        SecAggError::InconsistentSurvivorSet(fed.ids[3].node_id().clone())
    );
    // Only its own: fewer than t_sss.
    let node = waiting.remove(0);
    let only_own = UnmaskRequest {
        signatures: vec![sigs[0].clone()],
    };
    assert_eq!(
        node.unmask(&only_own).err().unwrap(),
        SecAggError::TooFewSurvivors {
            round: Round::Unmasking,
            have: 1,
            need: 4
        }
    );
    // A signer outside U3 or named twice.
    let node = waiting.remove(0);
    let twice = UnmaskRequest {
        signatures: vec![sigs[1].clone(), sigs[1].clone()],
    };
    assert!(matches!(
        node.unmask(&twice),
        Err(SecAggError::Duplicate { .. })
    ));
}

/// "Node 4 dropped" after its y_4 arrived: the honest nodes then reveal s-shares of 4,
/// never b-shares of 4, so y_4 stays masked by PRG(b_4).
#[test]
fn claiming_a_dropout_after_its_input_arrived_reveals_only_one_share() {
    let fed = fed(N);
    let (states, _, _) = to_r3(&fed, 1);
    let u3 = SurvivorSet {
        survivors: ids(&fed, &[0, 1, 2, 3]),
    };
    let mut waiting = Vec::new();
    let mut sigs = Vec::new();
    for (i, s) in states.into_iter().enumerate().take(4) {
        let (s, sig) = s.consistency(&fed.ids[i], &u3).unwrap();
        waiting.push(s);
        sigs.push(sig);
    }
    let four = fed.ids[4].node_id().clone();
    for s in waiting {
        let shares = s
            .unmask(&UnmaskRequest {
                signatures: sigs.clone(),
            })
            .unwrap();
        assert!(shares.b_shares.iter().all(|(v, _)| *v != four));
        assert_eq!(shares.s_shares.len(), 1);
        assert_eq!(shares.s_shares[0].0, four);
    }
}

#[test]
fn an_identity_mix_up_is_refused() {
    let fed = fed(N);
    let (mut states, u3, _) = to_r3(&fed, 1);
    let s = states.remove(0);
    assert!(matches!(
        s.consistency(&fed.ids[1], &u3),
        Err(SecAggError::WrongIdentity { .. })
    ));
    // A node outside the cohort cannot join.
    let outsider = NodeIdentity::generate(NodeId::new("OUT").unwrap()).unwrap();
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    assert!(matches!(
        client::begin(&outsider, &policy, &begin, NOW, None, &mut rng(1)),
        Err(SecAggError::NotInCohort(_))
    ));
}

#[test]
fn the_server_drops_a_node_whose_messages_are_wrong() {
    let fed = fed(N);
    let begin = begin_msg(&fed, params(N as u32, 4, 1), "q", 1);
    let policy = policy(&fed, &begin.params);
    let mut server = Server::new(&begin, &fed.registry_key.verifying_key(), NOW).unwrap();
    let (_, keys, _) = r0(&fed, &begin, &policy);
    // On node 1's stream, node 0's keys.
    assert!(matches!(
        server.receive_keys(fed.ids[1].node_id(), keys[0].clone()),
        Err(SecAggError::Protocol { .. })
    ));
    let mut bad = keys[2].clone();
    bad.s_pk = [9; 32];
    assert!(matches!(
        server.receive_keys(fed.ids[2].node_id(), bad),
        Err(SecAggError::KeySignature(_))
    ));
    server
        .receive_keys(fed.ids[0].node_id(), keys[0].clone())
        .unwrap();
    assert!(matches!(
        server.receive_keys(fed.ids[0].node_id(), keys[0].clone()),
        Err(SecAggError::Duplicate { .. })
    ));
    // Out of phase.
    assert!(matches!(
        server.close_shares(),
        Err(SecAggError::Protocol { .. })
    ));
}
