//! Retry what is transient, isolate what is not: the apply step shared by every projection.
//!
//! Guarantee (no record holds back another): a batch's transaction that PostgreSQL refuses
//! because of a value ([`Failure::Record`]: SQLSTATE class 22, 23 or 54, or a value sqlx cannot
//! encode) is bisected: the batch is split into two halves in log order, each applied in its
//! own transaction with the offsets up to its end, and a half that fails again is split
//! again, down to the single record. That record is dead-lettered with the database's reason
//! (class [`UNSTORABLE`]), and only once the broker has acknowledged the letter is its offset
//! moved, in a transaction of its own, before any later record of the batch is applied.
//! Everything else is applied exactly once and in log order, so the records of a namespace
//! after the bad one are applied after it is isolated. A [`Failure::Transient`] failure (and a
//! refusal that no record can explain: a transaction without records) is returned to the
//! caller, which retries the whole batch with backoff: halves already committed are then
//! skipped by their stored offsets, and nothing is skipped that was not isolated. A crash
//! after a letter was acknowledged and before its offset moved yields a second letter for the
//! same record, never a lost one.
//!
//! Cost: `k` bad records in a batch of `n` take about `2 k log2 n` extra transactions; a batch
//! without bad records takes one, as before.

use std::collections::BTreeMap;
use std::future::Future;

use memos_kafka::ProduceError;
use memos_postgres::errors::{self, Failure};

/// Error class of a record PostgreSQL refuses to store (dead-letter header and metric label).
pub const UNSTORABLE: &str = "unstorable";

/// One projection's transaction, as the isolation drives it.
pub trait Apply {
    /// A decoded record, with its place in the log.
    type Item;
    /// What a transaction decided (merged across the transactions of a bisected batch).
    type Outcome: Default;

    /// Partition and offset of `item`.
    fn position(item: &Self::Item) -> (i32, i64);

    /// Applies `items` (log order) and moves the offsets to `next_offsets`, in one
    /// transaction; returns what it decided and how many items had already been applied.
    fn apply(
        &self,
        items: &[Self::Item],
        next_offsets: &BTreeMap<i32, i64>,
    ) -> impl Future<Output = Result<(Self::Outcome, usize), sqlx::Error>>;

    /// Adds `from` to `into`.
    fn merge(into: &mut Self::Outcome, from: Self::Outcome);
}

/// A record isolated because PostgreSQL refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    pub partition: i32,
    pub offset: i64,
    /// SQLSTATE, when the database answered one (none for an encoding refusal).
    pub sqlstate: Option<String>,
    /// The database's reason, `SQLSTATE 22P05: unsupported Unicode escape sequence ...`.
    pub reason: String,
}

/// What applying a batch with isolation did.
#[derive(Debug, Default)]
pub struct Isolated<O> {
    pub outcome: O,
    pub already_applied: usize,
    /// Records dead-lettered by this call, in log order.
    pub poisoned: Vec<Poisoned>,
    /// Transactions committed (1 for a batch without bad records).
    pub transactions: usize,
}

/// Why a batch was not applied; both are transient, the caller retries the batch.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("dead-lettering a record PostgreSQL refused: {0}")]
    DeadLetter(#[from] ProduceError),
}

/// Next offsets once `items[..hi]` are done; the whole batch's (`all`) once every item is.
fn offsets_through<A: Apply>(items: &[A::Item], hi: usize, all: &BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
    if hi == items.len() {
        return all.clone();
    }
    let mut next = BTreeMap::new();
    for item in &items[..hi] {
        let (partition, offset) = A::position(item);
        let entry = next.entry(partition).or_insert(offset + 1);
        *entry = (*entry).max(offset + 1);
    }
    next
}

/// Applies `items` (log order) with the batch's `next_offsets`, isolating the records
/// PostgreSQL refuses (see the module documentation). `dead_letter` must return only once the
/// broker has acknowledged the letter for the record it is given.
pub async fn apply_isolating<A, D>(
    apply: &A,
    items: &[A::Item],
    next_offsets: &BTreeMap<i32, i64>,
    mut dead_letter: D,
) -> Result<Isolated<A::Outcome>, ApplyError>
where
    A: Apply,
    D: AsyncFnMut(&A::Item, &Poisoned) -> Result<(), ProduceError>,
{
    let mut done = Isolated::default();
    // Ranges of `items` still to apply, the next one on top; `true`: its single item was
    // isolated, only its offsets remain to move.
    let mut todo = vec![(0, items.len(), false)];
    while let Some((lo, hi, isolated)) = todo.pop() {
        let range = if isolated { &items[lo..lo] } else { &items[lo..hi] };
        let offsets = offsets_through::<A>(items, hi, next_offsets);
        let error = match apply.apply(range, &offsets).await {
            Ok((outcome, stale)) => {
                A::merge(&mut done.outcome, outcome);
                done.already_applied += stale;
                done.transactions += 1;
                continue;
            }
            Err(error) => error,
        };
        // A refusal of a transaction without records is no record's fault: retried, never
        // skipped.
        if errors::classify(&error) == Failure::Transient || range.is_empty() {
            return Err(error.into());
        }
        if let [item] = range {
            let (partition, offset) = A::position(item);
            let poisoned = Poisoned {
                partition,
                offset,
                sqlstate: errors::sqlstate(&error).map(|c| c.into_owned()),
                reason: errors::reason(&error),
            };
            dead_letter(item, &poisoned).await?;
            done.poisoned.push(poisoned);
            todo.push((lo, hi, true));
        } else {
            let mid = lo + range.len() / 2;
            todo.push((mid, hi, false));
            todo.push((lo, mid, false));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;

    /// A store that refuses items with a negative value, applies all-or-nothing per
    /// transaction, and keeps offsets like `projection_offsets` (stale items skipped).
    #[derive(Default)]
    struct Store {
        applied: RefCell<Vec<(i32, i64)>>,
        offsets: RefCell<BTreeMap<i32, i64>>,
        transactions: RefCell<usize>,
        /// Fail the nth transaction (1-based) as if the connection was lost.
        lose_connection_at: Option<usize>,
    }

    type Item = (i32, i64, i32);

    impl Apply for Store {
        type Item = Item;
        type Outcome = Vec<(i32, i64)>;

        fn position(item: &Item) -> (i32, i64) {
            (item.0, item.1)
        }

        async fn apply(
            &self,
            items: &[Item],
            next_offsets: &BTreeMap<i32, i64>,
        ) -> Result<(Self::Outcome, usize), sqlx::Error> {
            *self.transactions.borrow_mut() += 1;
            if self.lose_connection_at == Some(*self.transactions.borrow()) {
                return Err(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()));
            }
            let stored = self.offsets.borrow().clone();
            let (fresh, stale): (Vec<&Item>, Vec<&Item>) = items
                .iter()
                .partition(|i| i.1 >= stored.get(&i.0).copied().unwrap_or(0));
            if fresh.iter().any(|i| i.2 < 0) {
                return Err(sqlx::Error::Encode("value out of range".into()));
            }
            let outcome: Vec<(i32, i64)> = fresh.iter().map(|i| (i.0, i.1)).collect();
            self.applied.borrow_mut().extend(&outcome);
            let mut offsets = self.offsets.borrow_mut();
            for (p, o) in next_offsets {
                let e = offsets.entry(*p).or_insert(0);
                *e = (*e).max(*o);
            }
            Ok((outcome, stale.len()))
        }

        fn merge(into: &mut Self::Outcome, from: Self::Outcome) {
            into.extend(from);
        }
    }

    /// Two partitions interleaved, offsets 0.. in each; `bad` are the indices refused.
    fn batch(n: usize, bad: &[usize]) -> Vec<Item> {
        (0..n)
            .map(|i| {
                let value = if bad.contains(&i) { -1 } else { 1 };
                ((i % 2) as i32, (i / 2) as i64, value)
            })
            .collect()
    }

    fn all_offsets(items: &[Item]) -> BTreeMap<i32, i64> {
        let mut next = BTreeMap::new();
        for (p, o, _) in items {
            let e = next.entry(*p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        next
    }

    /// Positions, in the order they were applied or dead-lettered.
    type Positions = Vec<(i32, i64)>;

    fn run(store: &Store, items: &[Item]) -> Result<(Isolated<Positions>, Positions), ApplyError> {
        let letters = RefCell::new(Vec::new());
        let offsets = all_offsets(items);
        let done = futures::executor::block_on(apply_isolating(
            store,
            items,
            &offsets,
            async |item: &Item, p: &Poisoned| {
                assert_eq!((item.0, item.1), (p.partition, p.offset));
                // The letter is sent before the offsets move past the record.
                assert!(store.offsets.borrow().get(&item.0).copied().unwrap_or(0) <= item.1);
                letters.borrow_mut().push((item.0, item.1));
                Ok(())
            },
        ))?;
        Ok((done, letters.into_inner()))
    }

    #[test]
    fn a_clean_batch_is_one_transaction() {
        let store = Store::default();
        let items = batch(100, &[]);
        let (done, letters) = run(&store, &items).unwrap();
        assert_eq!(
            (done.transactions, done.outcome.len(), letters.len()),
            (1, 100, 0)
        );
        assert_eq!(*store.offsets.borrow(), all_offsets(&items));
    }

    #[test]
    fn bad_records_are_isolated_and_everything_else_applied_in_order() {
        for bad in [
            vec![0],
            vec![99],
            vec![37],
            vec![3, 4, 5],
            vec![0, 50, 98, 99],
            (0..100).collect(),
        ] {
            let store = Store::default();
            let items = batch(100, &bad);
            let (done, letters) = run(&store, &items).unwrap();
            let expected_letters: Vec<(i32, i64)> = bad.iter().map(|&i| (items[i].0, items[i].1)).collect();
            assert_eq!(letters, expected_letters, "dead-lettered in log order, once each");
            let applied = store.applied.borrow().clone();
            let good: Vec<(i32, i64)> = (0..100)
                .filter(|i| !bad.contains(i))
                .map(|i| (items[i].0, items[i].1))
                .collect();
            assert_eq!(applied, good, "each good record applied once, in log order");
            assert_eq!(done.outcome, good);
            assert_eq!(
                *store.offsets.borrow(),
                all_offsets(&items),
                "offsets past everything"
            );
            assert_eq!(done.poisoned.len(), bad.len());
            if bad.len() == 1 {
                assert!(
                    done.transactions <= 2 * 7 + 2,
                    "{} transactions",
                    done.transactions
                );
            }
        }
    }

    #[test]
    fn a_transient_failure_mid_bisect_is_retried_and_skips_nothing() {
        for at in 1..12 {
            let mut store = Store {
                lose_connection_at: Some(at),
                ..Store::default()
            };
            let items = batch(40, &[7, 30]);
            let first = run(&store, &items);
            assert!(
                matches!(first, Err(ApplyError::Postgres(sqlx::Error::Io(_)))),
                "{at}"
            );
            store.lose_connection_at = None;
            let (done, _) = run(&store, &items).unwrap();
            let applied: BTreeSet<(i32, i64)> = store.applied.borrow().iter().copied().collect();
            assert_eq!(
                applied.len(),
                store.applied.borrow().len(),
                "nothing applied twice"
            );
            assert_eq!(applied.len(), 38, "every good record applied ({at})");
            assert_eq!(*store.offsets.borrow(), all_offsets(&items));
            assert!(done.already_applied <= 38);
        }
    }

    #[test]
    fn a_refusal_without_records_is_not_a_reason_to_skip() {
        struct Refuses;
        impl Apply for Refuses {
            type Item = Item;
            type Outcome = ();
            fn position(item: &Item) -> (i32, i64) {
                (item.0, item.1)
            }
            async fn apply(&self, _: &[Item], _: &BTreeMap<i32, i64>) -> Result<((), usize), sqlx::Error> {
                Err(sqlx::Error::Encode("offsets".into()))
            }
            fn merge(_: &mut (), _: ()) {}
        }
        let offsets = BTreeMap::from([(0, 5)]);
        let result = futures::executor::block_on(apply_isolating(
            &Refuses,
            &[],
            &offsets,
            async |_: &Item, _: &Poisoned| Ok(()),
        ));
        assert!(matches!(result, Err(ApplyError::Postgres(_))));
    }
}
