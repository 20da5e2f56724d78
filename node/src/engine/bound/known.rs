//! Bounding for the people load found over the limit ([`super::Plan::Known`]) in one
//! pass over the query's rows, instead of two joins and a sort.
//!
//! Load lists the people with more than m rows and indexes their ids ([`PersonIndex`]).
//! A query's rows stream through one [`PartitionStream`] per input partition: a row whose
//! person is not in the index passes straight on (that person has at most m rows, so
//! bounding could not drop one); a row of a person in the index is ranked by the query's
//! keyed hash ([`super::row_ranks`]), its batch is held, and it is offered to that
//! person's m slots of lowest rank so far ([`Best`], shared by the partitions). When the
//! last partition's input ends, the rows in the slots are taken from the held batches
//! and emitted. The rows kept are exactly the window plan's for the same key (two rows
//! that tie on rank are identical, so which one is kept does not change the answer); the
//! tests in `super` compare every plan.
//!
//! Cost (BENCHMARKS.md, "Contribution bounding"): one probe per row, one keyed hash and
//! one slot comparison per row of a person over m, and one copy of the rows kept. Memory:
//! the rows of people over m, as the window's sort held them, and m slots per such
//! person (fewer than their rows, since each has more than m).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array, make_comparator,
};
use datafusion::arrow::compute::{SortOptions, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::common::hash_utils::create_hashes_with_hasher;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use futures::{StreamExt, TryStreamExt, stream};

use super::RowKey;

/// No further id in a hash chain.
const END: u32 = u32::MAX;

/// The ids of the people over the limit, for looking a row's person up in one hash
/// probe. Ids are compared by value after the hash matches, so two people whose ids hash
/// alike are never merged.
pub(crate) struct PersonIndex {
    hasher: foldhash::fast::RandomState,
    /// One bit per hash prefix, set for the ids': most rows belong to people within m,
    /// and a bitset of 8–16 bits per id fits in a core's cache where the map does not, so
    /// about nine in ten of those rows are told apart without touching the map.
    bits: Vec<u64>,
    /// How far to shift a hash right to get its bit's position.
    shift: u32,
    /// First id (position in `ids`) with a given hash; `next` chains the others.
    first: HashMap<u64, u32, foldhash::fast::RandomState>,
    next: Vec<u32>,
    ids: ArrayRef,
}

impl fmt::Debug for PersonIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PersonIndex({} people)", self.ids.len())
    }
}

impl PersonIndex {
    /// Index `ids` (one person each, no NULLs, distinct).
    pub(crate) fn new(ids: ArrayRef) -> DfResult<PersonIndex> {
        if u32::try_from(ids.len()).map_or(true, |n| n == END) {
            return Err(DataFusionError::Execution(format!(
                "{} people over max_rows_per_person: more than this index can hold",
                ids.len()
            )));
        }
        let hasher = foldhash::fast::RandomState::default();
        let mut hashes = vec![0u64; ids.len()];
        create_hashes_with_hasher([&ids], &hasher, &mut hashes)?;
        Ok(PersonIndex::with_hashes(ids, hasher, &hashes))
    }

    /// The index of `ids` whose hashes under `hasher` are `hashes`.
    fn with_hashes(
        ids: ArrayRef,
        hasher: foldhash::fast::RandomState,
        hashes: &[u64],
    ) -> PersonIndex {
        let width = (ids.len() * 8).next_power_of_two().max(64);
        let shift = 64 - width.trailing_zeros();
        let mut bits = vec![0u64; width / 64];
        let mut first = HashMap::with_capacity_and_hasher(ids.len(), Default::default());
        let mut next = vec![END; ids.len()];
        for (i, h) in (0u32..).zip(hashes) {
            let b = (h >> shift) as usize;
            bits[b / 64] |= 1 << (b % 64);
            if let Some(prev) = first.insert(*h, i) {
                next[i as usize] = prev;
            }
        }
        PersonIndex {
            hasher,
            bits,
            shift,
            first,
            next,
            ids,
        }
    }

    /// The ids indexed, for the benchmark's join plan.
    #[cfg(feature = "bench")]
    pub(crate) fn ids(&self) -> ArrayRef {
        self.ids.clone()
    }

    /// The number of people indexed.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// For each row of `persons`, that person's position in the index, or [`END`].
    fn lookup(&self, persons: &ArrayRef) -> DfResult<Vec<u32>> {
        let mut hashes = vec![0u64; persons.len()];
        create_hashes_with_hasher([persons], &self.hasher, &mut hashes)?;
        self.find(persons, &hashes)
    }

    /// [`PersonIndex::lookup`] with the rows' hashes given.
    fn find(&self, persons: &ArrayRef, hashes: &[u64]) -> DfResult<Vec<u32>> {
        let same = make_comparator(persons.as_ref(), self.ids.as_ref(), SortOptions::default())?;
        Ok(hashes
            .iter()
            .enumerate()
            .map(|(r, h)| {
                let b = (h >> self.shift) as usize;
                if self.bits[b / 64] & (1 << (b % 64)) == 0 {
                    return END;
                }
                let mut at = self.first.get(h).copied().unwrap_or(END);
                while at != END && same(r, at as usize) != Ordering::Equal {
                    at = self.next[at as usize];
                }
                at
            })
            .collect())
    }
}

/// What the partitions share: how many are still reading, the batches of rows held,
/// and each held person's m rows of lowest rank so far.
struct Shared {
    running: usize,
    batches: Vec<RecordBatch>,
    best: Option<Best>,
}

/// Per person (by index position), up to m (rank, batch, row) of the lowest ranks seen,
/// chosen as rows arrive, so nothing is left to sort when the input ends.
struct Best {
    m: usize,
    rank: Vec<u64>,
    at: Vec<(u32, u32)>,
    len: Vec<u32>,
    /// The slot of the person's highest rank kept, once they hold m.
    top: Vec<u32>,
}

impl Best {
    fn new(people: usize, m: usize) -> Best {
        Best {
            m,
            rank: vec![0; people * m],
            at: vec![(0, 0); people * m],
            len: vec![0; people],
            top: vec![0; people],
        }
    }

    fn offer(&mut self, person: u32, rank: u64, at: (u32, u32)) {
        let (p, m) = (person as usize, self.m);
        let base = p * m;
        let n = self.len[p] as usize;
        if n < m {
            self.rank[base + n] = rank;
            self.at[base + n] = at;
            self.len[p] += 1;
            if n + 1 == m {
                self.top[p] = highest(&self.rank[base..base + m]);
            }
        } else if rank < self.rank[base + self.top[p] as usize] {
            // A tie keeps the row already held: two rows that tie are identical.
            let slot = base + self.top[p] as usize;
            self.rank[slot] = rank;
            self.at[slot] = at;
            self.top[p] = highest(&self.rank[base..base + m]);
        }
    }

    /// The rows kept, by batch, each batch's in row order.
    fn kept(&self, batches: usize) -> Vec<Vec<u32>> {
        let mut by_batch: Vec<Vec<u32>> = vec![Vec::new(); batches];
        for (p, &n) in self.len.iter().enumerate() {
            for &(b, r) in &self.at[p * self.m..p * self.m + n as usize] {
                by_batch[b as usize].push(r);
            }
        }
        for rows in &mut by_batch {
            rows.sort_unstable();
        }
        by_batch
    }
}

/// The position of the highest of `ranks` (at most m ≤ u32::MAX of them).
fn highest(ranks: &[u64]) -> u32 {
    let mut top = 0;
    for (i, r) in ranks.iter().enumerate() {
        if *r > ranks[top] {
            top = i;
        }
    }
    top as u32
}

/// The settings every partition reads.
struct Settings {
    index: Arc<PersonIndex>,
    /// The position of the person id among the input's columns (every one of which is
    /// ranked, as the window plan ranks them).
    person: usize,
    m: usize,
    key: RowKey,
    schema: SchemaRef,
}

/// One input partition of the bounded rows.
struct Partition {
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    settings: Arc<Settings>,
    shared: Arc<Mutex<Shared>>,
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BoundKnown(partition {}, m = {}, {:?})",
            self.partition, self.settings.m, self.settings.index
        )
    }
}

/// A table whose rows are `input`'s with at most `m` rows per person: the person id is
/// column `person`; `index` lists the people over m.
pub(super) fn table(
    input: Arc<dyn ExecutionPlan>,
    person: usize,
    index: Arc<PersonIndex>,
    m: u32,
    key: RowKey,
) -> DfResult<StreamingTable> {
    let schema = input.schema();
    let n = input.output_partitioning().partition_count();
    let settings = Arc::new(Settings {
        index,
        person,
        m: m as usize,
        key,
        schema: schema.clone(),
    });
    let shared = Arc::new(Mutex::new(Shared {
        running: n,
        batches: Vec::new(),
        best: None,
    }));
    let partitions: Vec<Arc<dyn PartitionStream>> = (0..n)
        .map(|partition| {
            Arc::new(Partition {
                input: input.clone(),
                partition,
                settings: settings.clone(),
                shared: shared.clone(),
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    StreamingTable::try_new(schema, partitions)
}

impl PartitionStream for Partition {
    fn schema(&self) -> &SchemaRef {
        &self.settings.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = self.settings.schema.clone();
        let input = match self.input.execute(self.partition, ctx) {
            Ok(s) => s,
            Err(e) => {
                return Box::pin(RecordBatchStreamAdapter::new(
                    schema,
                    stream::once(async move { Err(e) }),
                ));
            }
        };
        let passing = input
            .and_then({
                let (settings, shared) = (self.settings.clone(), self.shared.clone());
                move |batch| {
                    let out = split(&settings, &shared, &batch);
                    async move { out }
                }
            })
            .try_filter(|b| futures::future::ready(b.num_rows() > 0));
        let shared = self.shared.clone();
        let held = stream::once(async move { finish(&shared) })
            .map_ok(|batches| stream::iter(batches.into_iter().map(Ok)))
            .try_flatten();
        Box::pin(RecordBatchStreamAdapter::new(schema, passing.chain(held)))
    }
}

fn poisoned() -> DataFusionError {
    DataFusionError::Execution("a bounding partition failed while holding rows".into())
}

/// Pass on the rows of people within m; rank and hold the others'.
fn split(
    settings: &Settings,
    shared: &Mutex<Shared>,
    batch: &RecordBatch,
) -> DfResult<RecordBatch> {
    let at = settings.index.lookup(batch.column(settings.person))?;
    // The rows of people over m, and who each one's person is.
    let (heavy, people): (Vec<u32>, Vec<u32>) = (0u32..)
        .zip(&at)
        .filter(|(_, p)| **p != END)
        .map(|(r, p)| (r, *p))
        .unzip();
    if heavy.is_empty() {
        return Ok(batch.clone());
    }
    let within = BooleanArray::from_iter(at.iter().map(|&p| Some(p == END)));
    let rows = take_record_batch(batch, &UInt32Array::from(heavy))?;
    let ranks = super::row_ranks(settings.key, rows.columns())?;
    let rows = compact(rows)?;
    let mut s = shared.lock().map_err(|_| poisoned())?;
    let b = u32::try_from(s.batches.len())
        .map_err(|_| DataFusionError::Execution("too many batches held for bounding".into()))?;
    s.batches.push(rows);
    let (people_over, m) = (settings.index.len(), settings.m);
    let best = s.best.get_or_insert_with(|| Best::new(people_over, m));
    for ((&person, &rank), row) in people.iter().zip(&ranks).zip(0u32..) {
        best.offer(person, rank, (b, row));
    }
    drop(s);
    Ok(filter_record_batch(batch, &within)?)
}

/// A held batch without the input buffers its string views point into (a `take` keeps
/// them all alive; NHS numbers fit inside the views themselves).
fn compact(batch: RecordBatch) -> DfResult<RecordBatch> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::DataType;
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8View => Arc::new(c.as_string_view().gc()) as ArrayRef,
            DataType::BinaryView => Arc::new(c.as_binary_view().gc()) as ArrayRef,
            _ => c.clone(),
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// At the end of one partition's input: if it was the last, return the rows kept.
fn finish(shared: &Mutex<Shared>) -> DfResult<Vec<RecordBatch>> {
    let (batches, best) = {
        let mut s = shared.lock().map_err(|_| poisoned())?;
        s.running = s.running.checked_sub(1).ok_or_else(|| {
            DataFusionError::Execution("a bounding partition was read twice".into())
        })?;
        if s.running > 0 {
            return Ok(Vec::new());
        }
        (std::mem::take(&mut s.batches), s.best.take())
    };
    let Some(best) = best else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (batch, rows) in batches.iter().zip(best.kept(batches.len())) {
        if !rows.is_empty() {
            out.push(take_record_batch(batch, &UInt32Array::from(rows))?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringViewArray};

    fn ids(n: usize) -> ArrayRef {
        Arc::new(StringViewArray::from_iter_values(
            (0..n).map(|i| format!("{:010}", 4_000_000_000u64 + 7 * i as u64)),
        ))
    }

    /// A miss in the bitset or the map would pass a person over m unbounded: every id
    /// indexed must be found at its own position, and ids never indexed must not be.
    #[test]
    fn every_person_over_m_is_found_and_nobody_else() {
        let all = ids(200_000);
        let index = PersonIndex::new(all.slice(0, 100_000)).unwrap();
        let at = index.lookup(&all).unwrap();
        for (r, p) in at.iter().enumerate() {
            let want = if r < 100_000 { r as u32 } else { END };
            assert_eq!(*p, want, "row {r}");
        }
        let ints: ArrayRef = Arc::new(Int64Array::from_iter_values(0..1000));
        let index = PersonIndex::new(ints.slice(0, 10)).unwrap();
        let at = index.lookup(&ints).unwrap();
        assert_eq!(at.iter().filter(|p| **p != END).count(), 10);
    }

    /// Ids whose hashes collide are still told apart by value: two people are never
    /// bounded together, and a person within m never borrows someone's limit.
    #[test]
    fn people_whose_ids_hash_alike_stay_apart() {
        let all = ids(50);
        let zeros = vec![0u64; 50];
        let index = PersonIndex::with_hashes(
            all.slice(0, 20),
            foldhash::fast::RandomState::default(),
            &zeros[..20],
        );
        let at = index.find(&all, &zeros).unwrap();
        for (r, p) in at.iter().enumerate() {
            let want = if r < 20 { r as u32 } else { END };
            assert_eq!(*p, want, "row {r}");
        }
    }

    #[test]
    fn the_lowest_m_ranks_are_kept_whatever_the_arrival_order() {
        let mut best = Best::new(2, 3);
        for (i, r) in [50u64, 10, 40, 30, 20, 60, 5].iter().enumerate() {
            best.offer(0, *r, (0, i as u32));
        }
        best.offer(1, 9, (1, 0));
        let kept = best.kept(2);
        // Ranks 5, 10 and 20 arrived as rows 6, 1 and 4.
        assert_eq!(kept, vec![vec![1, 4, 6], vec![0]]);
    }
}
