//! One session per (node, query id), ever: the rule as pure functions over the record the
//! node's store keeps.
//!
//! Why: a coordinator that declares a session aborted and runs another for the same query
//! with a different cohort could difference the two totals at share-level noise. So a node
//! refuses a second session for a query id whatever happened to the first, and a spend,
//! once recorded, stays recorded ("waste, never under-count"). The store records the
//! [`Participation`] durably (fsync) before the node sends its R0 keys, and again with
//! [`Stage::Spent`] before its masked input exists (see `client::ReadyToCommit`).

use crate::error::SecAggError;

/// How far a node went in its session for a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Advertised keys (R0); nothing spent.
    Joined,
    /// Recorded the budget spend, about to send its masked input (R2).
    Spent,
}

/// The store's record for (node, query id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participation {
    pub query_id: String,
    pub session_id: [u8; 32],
    pub stage: Stage,
}

fn hex8(b: &[u8; 32]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// May this node join `session_id` for `query_id`, given the store's record for that query
/// id (if any)? Only if there is none.
pub fn admit_session(
    prior: Option<&Participation>,
    query_id: &str,
    session_id: &[u8; 32],
) -> Result<Participation, SecAggError> {
    match prior {
        None => Ok(Participation {
            query_id: query_id.to_owned(),
            session_id: *session_id,
            stage: Stage::Joined,
        }),
        Some(p) => Err(SecAggError::AlreadyJoined {
            query_id: p.query_id.clone(),
            prior_session: hex8(&p.session_id),
        }),
    }
}

/// May this node spend for `session_id`? Only if the store's record for the query is this
/// very session, joined and not yet spent.
pub fn admit_spend(
    prior: Option<&Participation>,
    query_id: &str,
    session_id: &[u8; 32],
) -> Result<Participation, SecAggError> {
    match prior {
        Some(p)
            if p.query_id == query_id
                && p.session_id == *session_id
                && p.stage == Stage::Joined =>
        {
            Ok(Participation {
                stage: Stage::Spent,
                ..p.clone()
            })
        }
        Some(p) if p.session_id != *session_id => Err(SecAggError::AlreadyJoined {
            query_id: p.query_id.clone(),
            prior_session: hex8(&p.session_id),
        }),
        _ => Err(SecAggError::ParticipationMismatch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_session_per_query_ever() {
        let joined = admit_session(None, "q1", &[1; 32]).unwrap();
        assert_eq!(joined.stage, Stage::Joined);
        // A second session for the same query id: refused, before and after the spend.
        assert!(matches!(
            admit_session(Some(&joined), "q1", &[2; 32]),
            Err(SecAggError::AlreadyJoined { .. })
        ));
        assert!(matches!(
            admit_session(Some(&joined), "q1", &[1; 32]),
            Err(SecAggError::AlreadyJoined { .. })
        ));
        let spent = admit_spend(Some(&joined), "q1", &[1; 32]).unwrap();
        assert_eq!(spent.stage, Stage::Spent);
        assert!(admit_session(Some(&spent), "q1", &[3; 32]).is_err());
        // No double spend, no spend for a session never joined or for another one.
        assert_eq!(
            admit_spend(Some(&spent), "q1", &[1; 32]),
            Err(SecAggError::ParticipationMismatch)
        );
        assert_eq!(
            admit_spend(None, "q1", &[1; 32]),
            Err(SecAggError::ParticipationMismatch)
        );
        assert!(matches!(
            admit_spend(Some(&joined), "q1", &[9; 32]),
            Err(SecAggError::AlreadyJoined { .. })
        ));
    }
}
