//! The coordinator's core: authenticate a signed query against the requester
//! directory, relay it unchanged to every node serving its dataset concurrently,
//! report per-node progress, combine, record the answer durably (bound to its
//! requester and project) and hand it over; plus stored results (with a fresh
//! requester proof), the node list and budget relays. Domain types in and out, with
//! `Denial` as the error: the gRPC adapter is `server.rs`.

use crate::combine::{self, Expected, NodeAnswer};
use crate::config::{Config, NodeConfig, TotalKind};
use crate::fanout::{CallOutcome, NodeClient, RelayedBudget, RelayedBudgetRequest, RelayedQuery};
use crate::history::{Claim, History, QueryKey, Record};
use crate::model::{
    Coverage, Event, NodeOutcome, NodeProgress, NodeRef, NodeRefusal, SystemResult,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use phm_proto::{Denial, DenialReason, ProofOp, RequesterProof, SignedQuery};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Runs under way, by "requester\0query id": their content digest and a "finished"
/// signal.
type InFlight = HashMap<String, (String, watch::Receiver<bool>)>;

fn in_flight_key(key: &QueryKey<'_>) -> String {
    String::from_utf8_lossy(&key.key_bytes()).into_owned()
}

fn unauthenticated(message: String) -> Denial {
    Denial::new(DenialReason::Unauthenticated, message)
}

/// The coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    clients: Vec<NodeClient>,
    history: History,
    deadline: Duration,
    link_deadline: Duration,
    federation_id: String,
    requesters: Vec<crate::config::RequesterConfig>,
    validity: Duration,
    total_kinds: HashMap<String, TotalKind>,
    /// Query ids being answered right now, with their digest and a "finished" signal.
    in_flight: Mutex<InFlight>,
    /// Secure aggregation, when `[secure_aggregation]` is configured.
    secure: Option<crate::secure::SecureSetup>,
}

impl Coordinator {
    pub fn new(
        config: &Config,
        clients: Vec<NodeClient>,
        history: History,
        secure: Option<crate::secure::SecureSetup>,
    ) -> Coordinator {
        Coordinator {
            inner: Arc::new(Inner {
                clients,
                history,
                deadline: config.node_deadline,
                link_deadline: config.link_deadline,
                federation_id: config.federation_id.clone(),
                requesters: config.requesters.clone(),
                validity: config.query_validity,
                total_kinds: config
                    .datasets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.total_kind))
                    .collect(),
                in_flight: Mutex::new(HashMap::new()),
                secure,
            }),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Denial {
    tracing::error!(error = %e, "internal error");
    Denial::new(DenialReason::Internal, format!("coordinator error: {e}"))
}

fn refusal_message(d: &Denial) -> String {
    if d.reasons.is_empty() {
        d.message.clone()
    } else {
        format!("{} ({})", d.message, d.reasons.join("; "))
    }
}

fn total_note(kind: TotalKind, answered: usize, total: usize) -> String {
    let mut note = match kind {
        TotalKind::DistinctPeople => "Distinct people: in this dataset each person belongs to \
             exactly one partner, so the total counts each person once."
            .to_string(),
        TotalKind::SumOfPartnerCounts => "Sum of partner counts: a person known to more than \
             one partner (for example admitted at two trusts) counts once for each partner."
            .to_string(),
    };
    if answered < total {
        note.push_str(&format!(
            " Partial: only {answered} of the {total} partners serving this dataset answered; \
             the figures cover those partners only."
        ));
    }
    note
}

/// What a linked total means and what it leaves out.
fn linked_note(
    body: &phm_proto::QueryBody,
    l: &phm_proto::query::Linkage,
    partners: &[&str],
    answered: usize,
    sessions: usize,
) -> String {
    let how = if l.negated { "not found" } else { "found" };
    let mut note = format!(
        "Linked on NHS number: people of {} {how} in {} ({}), matched by privacy-preserving \
         set intersection, so no organisation (the coordinator included) learned who is in \
         another's data. Records without a valid NHS number at either side cannot be linked \
         and are not counted{}.",
        body.dataset,
        l.partner_dataset,
        partners.join(", "),
        if l.negated {
            " (NOT EXISTS counts only people with a valid number)"
        } else {
            ""
        }
    );
    if l.min_partner_rows > 1 {
        note.push_str(&format!(
            " \"Frequent\" means at least {} rows at one partner.",
            l.min_partner_rows
        ));
    }
    if partners.len() > 1 {
        note.push_str(
            " Each partner node is linked separately: a person linked at two of them counts once for each (sum of partner counts).",
        );
    }
    let anchors = sessions / partners.len().max(1);
    note.push_str(&format!(
        " Budget: each linkage session spends the query's epsilon at both of its nodes; each {} node took part in {} session{} and each partner node in up to {anchors}.",
        body.dataset,
        partners.len(),
        if partners.len() == 1 { "" } else { "s" }
    ));
    if answered < sessions {
        note.push_str(&format!(
            " Partial: only {answered} of the {sessions} linkage sessions completed; the figures cover those pairings only."
        ));
    }
    note
}

/// What a total means, given the coordinator's configuration and what each answering
/// partner's policy declares (`datasets.total_kind`). Any disagreement is said in the
/// note, and the reading falls back to the conservative "sum of partner counts" when
/// any partner says its people may also be counted elsewhere. A partner that declares
/// nothing (an older node) is not counted either way.
fn reconcile_total_kind(
    configured: TotalKind,
    declared: &[(String, Option<TotalKind>)],
) -> (TotalKind, Option<String>) {
    let disagree: Vec<&str> = declared
        .iter()
        .filter(|(_, k)| k.is_some_and(|k| k != configured))
        .map(|(id, _)| id.as_str())
        .collect();
    if disagree.is_empty() {
        return (configured, None);
    }
    let name = |k: TotalKind| match k {
        TotalKind::DistinctPeople => "distinct people",
        TotalKind::SumOfPartnerCounts => "a sum of partner counts",
    };
    let kind = if declared
        .iter()
        .any(|(_, k)| *k == Some(TotalKind::SumOfPartnerCounts))
    {
        TotalKind::SumOfPartnerCounts
    } else {
        configured
    };
    let note = format!(
        "Mismatch: this coordinator reads the dataset's total as {}, but the policy of {} \
         says otherwise; the total is read as {}. Ask the partners' IG leads and the \
         coordinator's operator to agree on datasets.total_kind.",
        name(configured),
        disagree.join(", "),
        name(kind)
    );
    (kind, Some(note))
}

/// Where a Submit's events go: progress, then the result, or the reason it failed.
pub type EventSender = mpsc::Sender<Result<Event, Denial>>;
pub type Events = mpsc::Receiver<Result<Event, Denial>>;

/// Replay a finished record: its progress events, then its result.
async fn replay(tx: &EventSender, record: Record) {
    for p in record.progress {
        if tx.send(Ok(Event::Progress(p))).await.is_err() {
            return;
        }
    }
    if let Some(r) = record.result {
        let _ = tx.send(Ok(Event::Result(Box::new(r)))).await;
    }
}

/// Removes the in-flight entry and wakes waiters however the run ends.
struct InFlightGuard {
    inner: Arc<Inner>,
    key: String,
    done: watch::Sender<bool>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inner.in_flight.lock() {
            map.remove(&self.key);
        }
        let _ = self.done.send(true);
    }
}

enum Plan {
    Run(InFlightGuard, bool),
    Replay(Box<Record>),
    Wait(watch::Receiver<bool>),
}

/// One query to fan out: the original message (relayed as received), its validated
/// body, its digest and the registry indices of the nodes serving its dataset.
struct Job {
    query: RelayedQuery,
    body: phm_proto::QueryBody,
    /// What the history holds for this query before it finishes.
    claim: Record,
    targets: Vec<usize>,
    /// For a linked question, the nodes serving its EXISTS dataset: each target
    /// (anchor) runs one linkage session with each of them.
    partners: Vec<usize>,
    /// Whether the id claim still has to be made durable before nodes are asked.
    needs_flush: bool,
}

/// What one node's call came to, ready for progress and coverage.
struct NodeResult {
    index: usize,
    progress: NodeProgress,
    answer: Option<NodeAnswer>,
    population: f64,
    /// Delta the node reports spending (0 unless it answered).
    delta: f64,
    /// How the node's policy says a total of the dataset reads (`None` unless it
    /// answered, or for a node that does not say).
    total_kind: Option<TotalKind>,
}

impl Inner {
    /// Who is asking: the federation is this one, the requester is in the directory
    /// and not revoked, the signature verifies, the message is fresh and its nonce
    /// new. Every Submit and GetResult passes here, so a stored result is only ever
    /// handed to a fresh, signed request of the requester that asked for it.
    fn authenticate(
        &self,
        op: &str,
        federation_id: &str,
        requester_id: &str,
        issued_at_unix_ms: i64,
        nonce: &[u8],
        verify: impl FnOnce(
            &phm_proto::signing::PublicKey,
        ) -> Result<(), phm_proto::signing::SignatureError>,
    ) -> Result<(), Denial> {
        self.check_federation(federation_id)?;
        let Some(requester) = self.requesters.iter().find(|r| r.id == requester_id) else {
            return Err(unauthenticated(format!(
                "requester {requester_id:?} is not in this coordinator's requester directory ([[requesters]] in coordinator.toml)"
            )));
        };
        if requester.revoked {
            return Err(unauthenticated(format!(
                "requester {requester_id:?} is revoked at this coordinator"
            )));
        }
        verify(&requester.public_key).map_err(|e| {
            unauthenticated(format!(
                "signature check failed for requester {requester_id:?}: {e}"
            ))
        })?;
        let now = chrono::Utc::now().timestamp_millis();
        let window = i64::try_from(self.validity.as_millis()).unwrap_or(i64::MAX);
        if now.saturating_sub(issued_at_unix_ms).saturating_abs() > window {
            return Err(Denial::new(
                DenialReason::Stale,
                format!(
                    "the request was issued {:.1} s from this coordinator's clock; it accepts requests issued within ±{} s (sign a fresh one, and check the requester's clock)",
                    now.saturating_sub(issued_at_unix_ms) as f64 / 1000.0,
                    self.validity.as_secs()
                ),
            ));
        }
        let forget = now.saturating_sub(window.saturating_mul(2));
        let fresh = self
            .history
            .record_nonce(op, requester_id, nonce, issued_at_unix_ms, forget)
            .map_err(internal)?;
        if !fresh {
            return Err(Denial::new(
                DenialReason::Replayed,
                "this request's nonce was already used by this requester: a replayed copy of an earlier message is refused (sign a fresh one)",
            ));
        }
        Ok(())
    }

    /// A signature is valid in one federation only: its audience.
    fn check_federation(&self, federation_id: &str) -> Result<(), Denial> {
        if federation_id == self.federation_id {
            return Ok(());
        }
        Err(unauthenticated(format!(
            "this request was signed for federation {federation_id:?}, but this coordinator serves federation {:?}",
            self.federation_id
        )))
    }

    fn plan(self: &Arc<Self>, key: &QueryKey<'_>, claim: &Record) -> Result<Plan, Denial> {
        let mut map = self
            .in_flight
            .lock()
            .map_err(|_| internal("in-flight table poisoned"))?;
        let flight = in_flight_key(key);
        if let Some((content, rx)) = map.get(&flight) {
            if *content != claim.content_digest {
                return Err(reused(key.query_id));
            }
            return Ok(Plan::Wait(rx.clone()));
        }
        let needs_flush = match self.history.claim(key, claim).map_err(internal)? {
            Claim::New => true,
            Claim::Existing(rec) if rec.content_digest != claim.content_digest => {
                return Err(reused(key.query_id));
            }
            Claim::Existing(rec)
                if rec.result.as_ref().is_some_and(|r| !r.coverage.retryable()) =>
            {
                return Ok(Plan::Replay(rec));
            }
            // Answered in part (a partner down, timed out or failing inside): asked
            // again, the partners that answered serve their cached releases.
            // Claimed by a run that never finished (the coordinator stopped): run it
            // again; nodes answer a known question from their release cache.
            Claim::Existing(_) => false,
        };
        let (tx, rx) = watch::channel(false);
        map.insert(flight.clone(), (claim.content_digest.clone(), rx));
        Ok(Plan::Run(
            InFlightGuard {
                inner: Arc::clone(self),
                key: flight,
                done: tx,
            },
            needs_flush,
        ))
    }

    async fn ask_node(
        &self,
        index: usize,
        query: RelayedQuery,
        expected: &Expected,
        nodes_total: u32,
    ) -> NodeResult {
        let client = &self.clients[index];
        let node = NodeRef::from(&client.config);
        let (outcome, elapsed) = client.query(query, self.deadline).await;
        // Response times stay in the coordinator's log: sent to analysts they would
        // amplify a timing side channel (a node's time grows with matched rows and
        // thresholded keys), cheaply, by averaging many near-free queries.
        tracing::debug!(node = %client.config.id, elapsed_ms = elapsed.as_millis(), "node call finished");
        node_result(index, node, nodes_total, outcome, expected)
    }

    /// One linkage session between anchor `index` and partner `partner`, reported as
    /// the anchor's answer (named with its partner, so coverage says which pairing).
    async fn ask_link(
        &self,
        index: usize,
        partner: usize,
        query: RelayedQuery,
        expected: &Expected,
        nodes_total: u32,
    ) -> NodeResult {
        let (anchor_client, partner_client) = (&self.clients[index], &self.clients[partner]);
        let mut node = NodeRef::from(&anchor_client.config);
        node.name = format!("{} (linked with {})", node.name, partner_client.config.id);
        let (outcome, elapsed) = crate::link::run_session(
            anchor_client,
            partner_client,
            query.into_inner(),
            self.link_deadline,
        )
        .await;
        tracing::debug!(
            anchor = %anchor_client.config.id, partner = %partner_client.config.id,
            elapsed_ms = elapsed.as_millis(), bytes = outcome.bytes, "linkage session finished"
        );
        let mut r = node_result(index, node, nodes_total, outcome.anchor, expected);
        if let Some(why) = outcome.partner_failure
            && r.progress.outcome != NodeOutcome::Answered
        {
            r.progress.message = why;
        }
        r
    }

    /// Fan out, stream progress, combine, record, stream the result.
    async fn run(self: Arc<Self>, job: Job, tx: EventSender, guard: InFlightGuard) {
        let _guard = guard;
        let Job {
            query,
            body,
            claim,
            targets,
            partners,
            needs_flush,
        } = job;
        if needs_flush && let Err(e) = self.history.flush().await {
            let _ = tx.send(Err(internal(e))).await;
            return;
        }
        if body.aggregation == phm_proto::Aggregation::SecureSum {
            self.run_secure(query, body, claim, targets, tx).await;
            return;
        }
        let expected = Expected::from_query(&body);
        let linked = body.linkage.is_some();
        let sessions: Vec<(usize, usize)> = targets
            .iter()
            .flat_map(|&a| {
                partners
                    .iter()
                    .filter(move |&&p| p != a)
                    .map(move |&p| (a, p))
            })
            .collect();
        let calls = if linked {
            sessions.len()
        } else {
            targets.len()
        };
        let nodes_total = u32::try_from(calls).unwrap_or(u32::MAX);
        tracing::info!(
            query_id = %body.query_id, requester = %body.requester_id,
            dataset = %body.dataset, nodes = targets.len(), sessions = sessions.len(),
            "fanning out query"
        );
        let mut pending: FuturesUnordered<
            std::pin::Pin<Box<dyn std::future::Future<Output = NodeResult> + Send + '_>>,
        > = if linked {
            sessions
                .iter()
                .map(|&(a, p)| {
                    Box::pin(self.ask_link(a, p, query.clone(), &expected, nodes_total))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = NodeResult> + Send>>
                })
                .collect()
        } else {
            targets
                .iter()
                .map(|&i| {
                    Box::pin(self.ask_node(i, query.clone(), &expected, nodes_total))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = NodeResult> + Send>>
                })
                .collect()
        };
        let mut results: Vec<NodeResult> = Vec::with_capacity(calls);
        let mut progress_log = Vec::with_capacity(targets.len());
        while let Some(r) = pending.next().await {
            // A client that went away does not stop the run: the answer is recorded.
            let _ = tx.send(Ok(Event::Progress(r.progress.clone()))).await;
            progress_log.push(r.progress.clone());
            results.push(r);
        }
        drop(pending);
        results.sort_by_key(|r| r.index);

        let partner_ids: Vec<&str> = partners
            .iter()
            .map(|&p| self.clients[p].config.id.as_str())
            .collect();
        let result = self.combined_result(&body, calls, &partner_ids, results);
        tracing::info!(
            query_id = %body.query_id,
            answered = result.coverage.answered.len(),
            partial = result.coverage.partial,
            "query combined"
        );
        let record = Record {
            progress: progress_log,
            result: Some(result.clone()),
            ..claim
        };
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        // Durable before anyone sees it, so a retry gets exactly this answer.
        if let Err(e) = self.history.finish(&key, &record).await {
            let _ = tx.send(Err(internal(e))).await;
            return;
        }
        let _ = tx.send(Ok(Event::Result(Box::new(result)))).await;
    }

    /// One secure-aggregation session over the nodes serving the dataset: progress for
    /// each member, then the system total (no per-partner figure exists to show).
    async fn run_secure(
        &self,
        query: RelayedQuery,
        body: phm_proto::QueryBody,
        claim: Record,
        targets: Vec<usize>,
        tx: EventSender,
    ) {
        let expected = Expected::from_query(&body);
        let nodes_total = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let node_of = |i: usize| NodeRef::from(&self.clients[i].config);
        let Some(setup) = &self.secure else {
            let _ = tx.send(Err(crate::secure::not_configured())).await;
            return;
        };
        tracing::info!(
            query_id = %body.query_id, requester = %body.requester_id,
            dataset = %body.dataset, nodes = targets.len(), "secure aggregation session"
        );
        let clients: Vec<(usize, &NodeClient)> =
            targets.iter().map(|&i| (i, &self.clients[i])).collect();
        let outcome = crate::secure::run_session(
            &clients,
            query.into_inner(),
            &body,
            setup,
            self.link_deadline,
        )
        .await;
        let mut coverage = Coverage::default();
        let mut progress_log = Vec::new();
        let known = self.history.populations().unwrap_or_default();
        let (mut registered, mut answered_pop) = (Some(0.0), Some(0.0));
        for m in &outcome.members {
            let node = node_of(m.index);
            let answered = m.outcome == NodeOutcome::Answered;
            let p = NodeProgress {
                node: node.clone(),
                nodes_total,
                outcome: m.outcome,
                reason: m.reason,
                message: if answered {
                    "in the secure total".into()
                } else {
                    m.message.clone()
                },
                epsilon_spent: m.epsilon,
            };
            let _ = tx.send(Ok(Event::Progress(p.clone()))).await;
            progress_log.push(p);
            let pop = self.node_population(&node.id, m.population, &known);
            registered = registered.zip(pop).map(|(a, b)| a + b);
            let refusal = NodeRefusal {
                node: node.clone(),
                reason: m.reason,
                message: m.message.clone(),
            };
            match m.outcome {
                NodeOutcome::Answered => {
                    answered_pop = answered_pop.zip(pop).map(|(a, b)| a + b);
                    coverage.answered.push(node);
                }
                NodeOutcome::Refused => coverage.refused.push(refusal),
                NodeOutcome::TimedOut => coverage.timed_out.push(node),
                NodeOutcome::Malformed => coverage.malformed.push(refusal),
                NodeOutcome::Unreachable => coverage.unreachable.push(node),
            }
        }
        coverage.partial = coverage.answered.len() < targets.len();
        coverage.population_registered = registered.unwrap_or(0.0);
        coverage.population_answered = if coverage.answered.is_empty() {
            0.0
        } else {
            answered_pop.unwrap_or(0.0)
        };
        let configured = self
            .total_kinds
            .get(&body.dataset)
            .copied()
            .unwrap_or_default();
        let (rows, note, mrc, eps, delta) = match &outcome.total {
            Ok(t) => {
                let combined = combine::combine_secure(
                    &expected,
                    &t.rows,
                    t.min_reportable_count,
                    t.rounded,
                    t.epsilon,
                    t.survivors,
                );
                let mut note = crate::secure::secure_note(t, configured);
                for n in &combined.notes {
                    note.push(' ');
                    note.push_str(n);
                }
                (
                    combined.rows,
                    note,
                    t.min_reportable_count,
                    t.epsilon,
                    t.delta,
                )
            }
            Err(why) => (
                Vec::new(),
                format!("Secure aggregation produced no total: {why}."),
                0.0,
                0.0,
                0.0,
            ),
        };
        let result = SystemResult {
            query_id: body.query_id.clone(),
            dataset: body.dataset.clone(),
            group_columns: expected.group_columns.clone(),
            aggregate_aliases: expected.aliases.clone(),
            rows,
            coverage,
            total_kind: configured,
            total_note: note,
            epsilon_spent_per_node: eps,
            breakdowns: Vec::new(),
            completed_at_unix_ms: chrono::Utc::now().timestamp_millis(),
            min_reportable_count: mrc,
            delta_spent_per_node: delta,
        };
        let record = Record {
            progress: progress_log,
            result: Some(result.clone()),
            ..claim
        };
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        if let Err(e) = self.history.finish(&key, &record).await {
            let _ = tx.send(Err(internal(e))).await;
            return;
        }
        let _ = tx.send(Ok(Event::Result(Box::new(result)))).await;
    }

    /// The system result: who answered (coverage), the combined figures, and how the
    /// total reads.
    fn combined_result(
        &self,
        body: &phm_proto::QueryBody,
        calls: usize,
        partners: &[&str],
        results: Vec<NodeResult>,
    ) -> SystemResult {
        let tally = self.tally(results, calls);
        let expected = Expected::from_query(body);
        let combined = combine::combine(&expected, &tally.answers);
        let configured = self
            .total_kinds
            .get(&body.dataset)
            .copied()
            .unwrap_or_default();
        let (mut kind, kind_note) = reconcile_total_kind(configured, &tally.declared);
        // With more than one partner node each pairing is linked on its own, so a
        // person linked at two partners counts once for each.
        if body.linkage.is_some() && partners.len() > 1 {
            kind = TotalKind::SumOfPartnerCounts;
        }
        let mut note = match &body.linkage {
            Some(l) => linked_note(body, l, partners, tally.answers.len(), calls),
            None => total_note(kind, tally.answers.len(), calls),
        };
        for n in kind_note.iter().chain(&combined.notes) {
            note.push(' ');
            note.push_str(n);
        }
        SystemResult {
            query_id: body.query_id.clone(),
            dataset: body.dataset.clone(),
            group_columns: expected.group_columns.clone(),
            aggregate_aliases: expected.aliases.clone(),
            rows: combined.rows,
            coverage: tally.coverage,
            total_kind: kind,
            total_note: note,
            epsilon_spent_per_node: combined.epsilon_spent_per_node,
            breakdowns: combined.breakdowns,
            completed_at_unix_ms: chrono::Utc::now().timestamp_millis(),
            min_reportable_count: combined.min_reportable_count,
            delta_spent_per_node: tally.delta_per_node,
        }
    }

    /// Sort the nodes' outcomes into coverage, and collect the answers to combine with
    /// what each answering node says about its spend and its total.
    fn tally(&self, results: Vec<NodeResult>, targets: usize) -> Tally {
        let mut tally = Tally {
            coverage: Coverage::default(),
            answers: Vec::new(),
            delta_per_node: 0.0,
            declared: Vec::new(),
        };
        let known = self.history.populations().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read remembered node populations");
            HashMap::new()
        });
        let mut registered = Some(0.0);
        let mut answered_population = Some(0.0);
        // A linked query reports one result per (anchor, partner) session: each node's
        // population counts once however many sessions it took part in.
        let mut counted = std::collections::HashSet::new();
        let mut answered_counted = std::collections::HashSet::new();
        for r in results {
            let client = &self.clients[r.index];
            let node = r.progress.node.clone();
            let first = counted.insert(r.index);
            let pop = self.node_population(&client.config.id, r.population, &known);
            if first {
                registered = registered.zip(pop).map(|(a, b)| a + b);
            }
            let refusal = |p: &NodeProgress| NodeRefusal {
                node: node.clone(),
                reason: p.reason,
                message: p.message.clone(),
            };
            let coverage = &mut tally.coverage;
            match r.progress.outcome {
                NodeOutcome::Answered => {
                    if answered_counted.insert(r.index) {
                        answered_population = answered_population
                            .zip((r.population > 0.0).then_some(r.population))
                            .map(|(a, b)| a + b);
                    }
                    coverage.answered.push(node.clone());
                }
                NodeOutcome::Refused => coverage.refused.push(refusal(&r.progress)),
                NodeOutcome::TimedOut => coverage.timed_out.push(node.clone()),
                NodeOutcome::Malformed => coverage.malformed.push(refusal(&r.progress)),
                NodeOutcome::Unreachable => coverage.unreachable.push(node.clone()),
            }
            if let Some(a) = r.answer {
                tally.delta_per_node = tally.delta_per_node.max(r.delta);
                tally
                    .declared
                    .push((client.config.id.clone(), r.total_kind));
                tally.answers.push(a);
            }
        }
        let coverage = &mut tally.coverage;
        coverage.partial = tally.answers.len() < targets;
        // 0 means unknown: a sum missing some partners would understate the population.
        coverage.population_registered = registered.unwrap_or(0.0);
        coverage.population_answered = if tally.answers.is_empty() {
            0.0
        } else {
            answered_population.unwrap_or(0.0)
        };
        tally
    }

    /// A node's registered population: the one it reports now (remembered for when it
    /// does not answer), else the one it last reported; `None` if never known.
    fn node_population(
        &self,
        node_id: &str,
        reported: f64,
        known: &HashMap<String, f64>,
    ) -> Option<f64> {
        if reported > 0.0 {
            if let Err(e) = self.history.remember_population(node_id, reported) {
                tracing::warn!(error = %e, "cannot remember node population");
            }
            Some(reported)
        } else {
            known.get(node_id).copied().filter(|p| *p > 0.0)
        }
    }
}

/// The nodes' outcomes sorted for one system result.
struct Tally {
    coverage: Coverage,
    answers: Vec<NodeAnswer>,
    /// Largest delta any answering node spent.
    delta_per_node: f64,
    /// What each answering node's policy says a total reads as.
    declared: Vec<(String, Option<TotalKind>)>,
}

/// What one node's outcome came to, checked against the query.
fn node_result(
    index: usize,
    node: NodeRef,
    nodes_total: u32,
    outcome: CallOutcome<phm_proto::result::Answer>,
    expected: &Expected,
) -> NodeResult {
    let mut result = NodeResult {
        index,
        progress: NodeProgress {
            node: node.clone(),
            nodes_total,
            outcome: NodeOutcome::Unreachable,
            reason: None,
            message: String::new(),
            epsilon_spent: 0.0,
        },
        answer: None,
        population: 0.0,
        delta: 0.0,
        total_kind: None,
    };
    let progress = &mut result.progress;
    match answered(outcome) {
        Ok(answer) => {
            let (epsilon, delta, population, kind) = (
                answer.release.epsilon_spent,
                answer.release.delta_spent,
                answer.population_noisy,
                answer.total_kind,
            );
            match combine::validate(expected, node, answer) {
                Ok(a) => {
                    progress.outcome = NodeOutcome::Answered;
                    progress.epsilon_spent = epsilon;
                    progress.message = "answered".into();
                    result.answer = Some(a);
                    result.population = population;
                    result.delta = delta;
                    result.total_kind = kind;
                }
                Err(m) => {
                    progress.outcome = NodeOutcome::Malformed;
                    // Decoding checked it is a finite, non-negative number.
                    progress.epsilon_spent = epsilon;
                    progress.message = format!("excluded: malformed answer: {m}");
                }
            }
        }
        Err(f) => {
            progress.outcome = f.outcome;
            progress.reason = f.reason;
            progress.epsilon_spent = f.epsilon_spent;
            progress.message = f.message;
        }
    }
    result
}

fn reused(query_id: &str) -> Denial {
    Denial::new(
        DenialReason::QueryIdReused,
        format!(
            "you already used query id {query_id:?} for a different query; \
             give the new query a fresh id"
        ),
    )
}

/// A node call that brought no usable answer, as progress and coverage report it.
struct Failed {
    outcome: NodeOutcome,
    reason: Option<DenialReason>,
    message: String,
    /// What a malformed answer claims to have spent (0 otherwise).
    epsilon_spent: f64,
}

/// The answer, or how the call failed: the one reading of a `CallOutcome`.
fn answered<T>(outcome: CallOutcome<T>) -> Result<T, Failed> {
    let failed = |outcome, reason, message| Failed {
        outcome,
        reason,
        message,
        epsilon_spent: 0.0,
    };
    match outcome {
        CallOutcome::Answered(a) => Ok(a),
        CallOutcome::Malformed {
            reason,
            epsilon_spent,
        } => Err(Failed {
            epsilon_spent,
            ..failed(
                NodeOutcome::Malformed,
                None,
                format!("excluded: malformed answer: {reason}"),
            )
        }),
        CallOutcome::Refused(d) => Err(failed(
            NodeOutcome::Refused,
            Some(d.reason),
            refusal_message(&d),
        )),
        CallOutcome::Unreachable(m) => Err(failed(NodeOutcome::Unreachable, None, m)),
        CallOutcome::TimedOut(m) => Err(failed(NodeOutcome::TimedOut, None, m)),
    }
}

/// One node's answer to a budget relay.
#[derive(Debug)]
pub struct NodeBudget {
    pub node: NodeRef,
    pub outcome: NodeOutcome,
    pub message: String,
    /// The node's own report, relayed unchanged; set when it answered.
    pub budget: Option<RelayedBudget>,
}

impl Coordinator {
    /// Start answering a signed query: authenticate it, claim its id, and fan it out
    /// (or replay a finished run, or wait for one under way). `relay` is the message
    /// as received, relayed unchanged; `signed` is its validated reading.
    pub fn submit(&self, signed: SignedQuery, relay: RelayedQuery) -> Result<Events, Denial> {
        if signed.signature.is_empty() {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                "the query is not signed; sign it with the requester's key",
            ));
        }
        // Which datasets exist is public (ListNodes), so this may come first.
        let serving = |dataset: &str| -> Vec<usize> {
            (0..self.inner.clients.len())
                .filter(|&i| self.inner.clients[i].config.serves(dataset))
                .collect()
        };
        let targets = serving(&signed.body.dataset);
        let partners = match &signed.body.linkage {
            None => Vec::new(),
            Some(l) => {
                let p = serving(&l.partner_dataset);
                if p.is_empty() {
                    return Err(Denial::new(
                        DenialReason::InvalidQuery,
                        format!(
                            "no registered node serves dataset {:?}, the EXISTS dataset",
                            l.partner_dataset
                        ),
                    ));
                }
                p
            }
        };
        if targets.is_empty() {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                format!(
                    "no registered node serves dataset {:?}",
                    signed.body.dataset
                ),
            ));
        }
        self.inner.authenticate(
            "submit",
            &signed.body.federation_id,
            &signed.body.requester_id,
            signed.body.issued_at_unix_ms,
            &signed.body.nonce,
            |k| signed.verify(k),
        )?;
        let body = signed.body;
        let claim = Record {
            digest: body.digest(),
            requester_id: body.requester_id.clone(),
            project_id: body.project_id.clone().unwrap_or_default(),
            content_digest: body.content_digest(),
            ..Default::default()
        };
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        let plan = self.inner.plan(&key, &claim)?;
        let (tx, rx) = mpsc::channel(targets.len() + 2);
        match plan {
            Plan::Run(guard, needs_flush) => {
                let inner = Arc::clone(&self.inner);
                let job = Job {
                    query: relay,
                    body,
                    claim,
                    targets,
                    partners,
                    needs_flush,
                };
                tokio::spawn(inner.run(job, tx, guard));
            }
            Plan::Replay(record) => {
                tokio::spawn(async move { replay(&tx, *record).await });
            }
            Plan::Wait(done) => {
                let inner = Arc::clone(&self.inner);
                tokio::spawn(inner.replay_when_done(body, done, tx));
            }
        }
        Ok(rx)
    }

    /// A stored result, for a fresh `get_result` proof (subject = the query id) by the
    /// requester who asked, under the same project.
    pub fn get_result(
        &self,
        query_id: &str,
        proof: RequesterProof,
    ) -> Result<SystemResult, Denial> {
        let id = query_id;
        if id.is_empty() || id.len() > phm_proto::query::MAX_ID_LEN {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                "query_id is missing or too long",
            ));
        }
        if proof.subject.as_deref() != Some(id) {
            return Err(unauthenticated(format!(
                "the proof is for {:?}, not for query {id:?}",
                proof.subject.as_deref().unwrap_or("")
            )));
        }
        self.inner.authenticate(
            ProofOp::GetResult.as_str(),
            &proof.federation_id,
            &proof.requester_id,
            proof.issued_at_unix_ms,
            &proof.nonce,
            |k| proof.verify(ProofOp::GetResult, k),
        )?;
        let key = QueryKey {
            requester_id: &proof.requester_id,
            query_id: id,
        };
        // Looked up under the proving requester only: another requester's ids are
        // not even visible, so "not found" says nothing about them.
        let not_found = || {
            Denial::new(
                DenialReason::NotFound,
                format!(
                    "requester {:?} has submitted no query with id {id:?} to this coordinator",
                    proof.requester_id
                ),
            )
        };
        let record = self.inner.history.get(&key).map_err(internal)?;
        let Some(record) = record else {
            return Err(not_found());
        };
        if record.requester_id != proof.requester_id {
            return Err(not_found());
        }
        let project = proof.project_id.clone().unwrap_or_default();
        if record.project_id != project {
            return Err(Denial::new(
                DenialReason::PolicyDenied,
                format!(
                    "query {id:?} was asked under project {:?}; sign the proof for that project to read it",
                    record.project_id
                ),
            ));
        }
        record.result.ok_or_else(|| {
            Denial::new(
                DenialReason::Unavailable,
                format!("query {id:?} has not finished yet"),
            )
        })
    }

    /// The registered nodes, in configuration order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeConfig> {
        self.inner.clients.iter().map(|c| &c.config)
    }

    /// Relay a budget request to every node. The nodes check the proof themselves;
    /// the coordinator only refuses one signed for another federation.
    pub async fn budget(
        &self,
        proof: &RequesterProof,
        request: RelayedBudgetRequest,
    ) -> Result<Vec<NodeBudget>, Denial> {
        self.inner.check_federation(&proof.federation_id)?;
        let deadline = self.inner.deadline;
        let calls = self.inner.clients.iter().map(|c| {
            let request = request.clone();
            async move {
                let mut nb = NodeBudget {
                    node: NodeRef::from(&c.config),
                    outcome: NodeOutcome::Unreachable,
                    message: String::new(),
                    budget: None,
                };
                match answered(c.budget(request, deadline).await) {
                    Ok(b) => {
                        nb.outcome = NodeOutcome::Answered;
                        nb.budget = Some(b);
                    }
                    Err(f) => {
                        nb.outcome = f.outcome;
                        nb.message = match f.reason {
                            Some(r) => {
                                format!("{}: {}", phm_proto::denial::reason_name(r), f.message)
                            }
                            None => f.message,
                        };
                    }
                }
                nb
            }
        });
        Ok(futures::future::join_all(calls).await)
    }
}

impl Inner {
    /// Wait for the run under way for the same question, then replay what it
    /// recorded.
    async fn replay_when_done(
        self: Arc<Self>,
        body: phm_proto::QueryBody,
        mut done: watch::Receiver<bool>,
        tx: EventSender,
    ) {
        // Err means the run's guard is gone: it has finished either way.
        let _ = done.wait_for(|d| *d).await;
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        match self.history.get(&key) {
            Ok(Some(rec)) if rec.result.is_some() => replay(&tx, rec).await,
            Ok(_) => {
                let _ = tx
                    .send(Err(Denial::new(
                        DenialReason::Unavailable,
                        "the earlier run of this query did not finish; submit it again",
                    )))
                    .await;
            }
            Err(e) => {
                let _ = tx.send(Err(internal(e))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partner_declaring_another_total_kind_is_flagged_and_the_reading_is_conservative() {
        let dp = Some(TotalKind::DistinctPeople);
        let sum = Some(TotalKind::SumOfPartnerCounts);
        let agree = [("A".to_string(), dp), ("B".to_string(), dp)];
        assert_eq!(
            reconcile_total_kind(TotalKind::DistinctPeople, &agree),
            (TotalKind::DistinctPeople, None)
        );
        let one_says_sum = [("A".to_string(), dp), ("RW2".to_string(), sum)];
        let (kind, note) = reconcile_total_kind(TotalKind::DistinctPeople, &one_says_sum);
        assert_eq!(kind, TotalKind::SumOfPartnerCounts);
        let note = note.unwrap();
        assert!(note.contains("RW2") && note.contains("Mismatch"), "{note}");
        // The coordinator is the conservative one: flagged, reading kept.
        let (kind, note) = reconcile_total_kind(TotalKind::SumOfPartnerCounts, &agree);
        assert_eq!(kind, TotalKind::SumOfPartnerCounts);
        assert!(note.unwrap().contains("A, B"));
        // An older node that declares nothing does not count either way.
        let silent = [("A".to_string(), None)];
        assert_eq!(
            reconcile_total_kind(TotalKind::DistinctPeople, &silent),
            (TotalKind::DistinctPeople, None)
        );
    }
}
