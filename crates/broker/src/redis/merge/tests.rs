use std::time::Duration;

use super::*;

fn id(ms: u64, seq: u64) -> EntryId {
    EntryId::new(ms, seq)
}

/// Entries of `partition` named `p<partition>:<id>`, as a read returns them.
fn page(partition: usize, ids: &[(u64, u64)]) -> Vec<(EntryId, String)> {
    ids.iter().map(|&(ms, seq)| (id(ms, seq), format!("p{partition}:{ms}-{seq}"))).collect()
}

fn names(released: Vec<(Rank, String)>) -> Vec<String> {
    released.into_iter().map(|(_, name)| name).collect()
}

#[test]
fn released_in_rank_order_ties_broken_by_partition() {
    let mut merge = Merge::new(3, 100);
    merge.take_page(0, page(0, &[(10, 0), (12, 0)]), false, 100);
    merge.take_page(2, page(2, &[(10, 0)]), false, 100);
    assert!(merge.release().is_empty(), "partition 1 not read yet: anything may still come from it");
    merge.take_page(1, page(1, &[(11, 0)]), false, 100);
    assert_eq!(names(merge.release()), ["p0:10-0", "p2:10-0", "p1:11-0", "p0:12-0"]);
    assert_eq!(merge.pending(), 0);
}

#[test]
fn entries_wait_for_the_partition_read_least_far() {
    let mut merge = Merge::new(2, 100);
    merge.take_page(0, page(0, &[(5, 0), (20, 0)]), false, 30);
    // A full page: partition 1 may hold more right after (4, 0).
    merge.take_page(1, page(1, &[(3, 0), (4, 0)]), true, 30);
    assert_eq!(merge.watermark(), id(4, 0));
    assert_eq!(names(merge.release()), ["p1:3-0", "p1:4-0"]);
    assert_eq!(merge.pending(), 2);
    assert_eq!(merge.pause(true, Duration::from_millis(20)), Duration::ZERO);
    merge.take_page(1, page(1, &[(25, 0)]), false, 30);
    assert_eq!(merge.watermark(), EntryId::before_time(30));
    assert_eq!(names(merge.release()), ["p0:5-0", "p0:20-0", "p1:25-0"]);
}

#[test]
fn the_slowest_clock_bounds_what_may_go() {
    let poll = Duration::from_millis(20);
    let mut merge = Merge::new(2, 100);
    merge.take_page(0, page(0, &[(100, 0)]), false, 100);
    // Partition 1's server read 100 ms too: it may still number an entry (100, 0).
    merge.take_page(1, Vec::new(), false, 100);
    assert_eq!(merge.watermark(), id(99, u64::MAX));
    assert!(merge.release().is_empty());
    assert_eq!(merge.pause(false, poll), Duration::from_millis(1), "a clock's tick away");
    merge.take_page(1, Vec::new(), false, 101);
    assert_eq!(names(merge.release()), ["p0:100-0"]);
    assert_eq!(merge.pause(false, poll), poll, "nothing waits: the poll interval");
    // A clock 50 ms behind holds entries back as long; the pause follows it, up to the poll.
    merge.take_page(0, page(0, &[(150, 0)]), false, 150);
    merge.take_page(1, Vec::new(), false, 105);
    assert!(merge.release().is_empty());
    assert_eq!(merge.pause(false, poll), poll);
}

/// Partition streams as `XADD` fills them: per partition, the milliseconds of its entries
/// (ids numbered as Redis numbers them).
fn world() -> Vec<Vec<EntryId>> {
    let ms: [&[u64]; 3] = [&[1, 1, 4, 9, 9, 15], &[2, 4, 4, 10, 16], &[1, 3, 9, 12, 20]];
    ms.iter()
        .map(|times| {
            let mut ids: Vec<EntryId> = Vec::new();
            for &t in *times {
                let seq = ids.last().filter(|last| last.ms == t).map_or(0, |last| last.seq + 1);
                ids.push(id(t, seq));
            }
            ids
        })
        .collect()
}

/// A replica reading `world` at the times `at`, `page` entries per read, the partitions in the
/// order `order`: what it releases, and (the control) the entries in the order they arrived.
fn replica(world: &[Vec<EntryId>], at: &[u64], page: usize, order: &[usize]) -> (Vec<String>, Vec<String>) {
    let mut merge = Merge::new(world.len(), 1000);
    let (mut released, mut arrived) = (Vec::new(), Vec::new());
    for &now in at {
        loop {
            let mut any_full = false;
            let wanted = merge.wanted();
            for &p in order.iter().filter(|p| wanted.contains(p)) {
                let after = merge.last(p);
                let read: Vec<(EntryId, String)> = world[p]
                    .iter()
                    .filter(|e| **e > after && e.ms <= now)
                    .take(page)
                    .map(|e| (*e, format!("p{p}:{e}")))
                    .collect();
                let full = read.len() == page;
                any_full |= full;
                arrived.extend(read.iter().map(|(_, name)| name.clone()));
                merge.take_page(p, read, full, now);
            }
            released.extend(names(merge.release()));
            if !any_full {
                break;
            }
        }
    }
    (released, arrived)
}

#[test]
fn every_replica_releases_the_same_order_however_its_reads_fall() {
    let world = world();
    let mut everything: Vec<Rank> =
        (0..world.len()).flat_map(|p| world[p].iter().map(move |id| Rank { id: *id, partition: p })).collect();
    everything.sort();
    let expected: Vec<String> = everything.iter().map(|r| format!("p{}:{}", r.partition, r.id)).collect();
    let (a, a_arrived) = replica(&world, &[0, 2, 5, 9, 11, 30], 2, &[0, 1, 2]);
    let (b, b_arrived) = replica(&world, &[1, 4, 10, 13, 16, 17, 30], 3, &[2, 0, 1]);
    let (c, _) = replica(&world, &[30], 1, &[1, 2, 0]);
    assert_eq!(a, expected);
    assert_eq!(b, expected);
    assert_eq!(c, expected);
    // Control: merged in the order the entries arrived, each replica orders them its own way,
    // and a cursor would name different places on each.
    assert_ne!(a_arrived, b_arrived);
    assert_ne!(a_arrived, expected);
    let mut sorted = a_arrived.clone();
    sorted.sort();
    let mut all = expected.clone();
    all.sort();
    assert_eq!(sorted, all, "the control got the same entries, only in another order");
}

#[test]
fn while_too_many_wait_only_the_partitions_holding_the_watermark_back_are_read() {
    let mut merge = Merge::new(2, 2);
    merge.take_page(0, page(0, &[(10, 0), (11, 0), (12, 0)]), false, 50);
    merge.take_page(1, page(1, &[(1, 0)]), true, 50);
    assert_eq!(names(merge.release()), ["p1:1-0"]);
    assert_eq!(merge.wanted(), [1]);
    merge.take_page(1, page(1, &[(2, 0)]), true, 50);
    assert_eq!(names(merge.release()), ["p1:2-0"]);
    assert_eq!(merge.wanted(), [1], "still three waiting");
    merge.take_page(1, page(1, &[(30, 0)]), false, 50);
    assert_eq!(names(merge.release()), ["p0:10-0", "p0:11-0", "p0:12-0", "p1:30-0"]);
    assert_eq!(merge.wanted(), [0, 1]);
}

#[test]
fn resuming_moves_the_last_entry_read_not_the_bound() {
    let mut merge = Merge::new(2, 10);
    merge.take_page(0, page(0, &[(10, 0)]), false, 20);
    merge.take_page(1, Vec::new(), false, 20);
    let watermark = merge.watermark();
    merge.resume(0, EntryId::ZERO);
    assert_eq!(merge.last(0), EntryId::ZERO);
    assert_eq!(merge.watermark(), watermark);
}

/// The entries of a stream with the ids `ids` before `before`, newest first, at most `n`.
fn older(partition: usize, ids: &[EntryId], before: EntryId, n: usize) -> (Vec<(EntryId, String)>, bool) {
    let page: Vec<_> =
        ids.iter().rev().filter(|e| **e < before).take(n).map(|e| (*e, format!("p{partition}:{e}"))).collect();
    let full = page.len() == n;
    (page, full)
}

/// Loads `streams` (each read by its server at `now[p]`), `page` entries per read.
fn load(streams: &[Vec<EntryId>], now: &[u64], page: usize, keep: usize) -> (Vec<String>, Merge<String>) {
    let firsts = (0..streams.len())
        .map(|p| {
            let (entries, full) = older(p, &streams[p], id(u64::MAX, u64::MAX), page);
            FirstPage { entries, full, now_ms: now[p] }
        })
        .collect();
    let mut load = Load::new(firsts, keep);
    while let Some((p, before)) = load.advance() {
        let (entries, full) = older(p, &streams[p], before, page);
        load.add_page(p, entries, full);
    }
    let (history, merge) = load.finish(1000);
    (names(history), merge)
}

#[test]
fn the_load_is_the_newest_stretch_of_the_order() {
    let busy: Vec<EntryId> = (1..=10).map(|ms| id(ms, 0)).collect();
    let quiet = vec![id(5, 0)];
    let (history, merge) = load(&[busy.clone(), quiet.clone()], &[100, 100], 3, 4);
    assert_eq!(history, ["p0:7-0", "p0:8-0", "p0:9-0", "p0:10-0"]);
    assert_eq!((merge.last(0), merge.last(1)), (id(10, 0), id(5, 0)));
    assert_eq!(merge.pending(), 0);
    // The tie at 5 ms: partition 1's entry ranks above partition 0's.
    let (history, _) = load(&[busy, quiet], &[100, 100], 3, 6);
    assert_eq!(history, ["p1:5-0", "p0:6-0", "p0:7-0", "p0:8-0", "p0:9-0", "p0:10-0"]);
}

#[test]
fn the_load_leaves_every_entry_above_the_watermark_waiting_however_many() {
    // Partition 0's server reads 100 ms, partition 1's only 41: above 40 ms nothing may go yet.
    let ahead: Vec<EntryId> = (30..=60).map(|ms| id(ms, 0)).collect();
    let behind = vec![id(35, 0), id(39, 0)];
    let (history, mut merge) = load(&[ahead.clone(), behind.clone()], &[100, 41], 5, 2);
    assert_eq!(history, ["p1:39-0", "p0:40-0"]);
    assert_eq!(merge.pending(), 20, "more than the history keeps, and none lost");
    assert_eq!((merge.last(0), merge.last(1)), (id(60, 0), id(39, 0)));
    merge.take_page(1, Vec::new(), false, 70);
    let expected: Vec<String> = (41..=60).map(|ms| format!("p0:{ms}-0")).collect();
    assert_eq!(names(merge.release()), expected);
    // Control: each partition's newest two, cut below the oldest of the one that had more
    // (59 ms): only 59 and 60 wait, and 41 to 58 are never read, as reading goes on after 60.
    let loaded: Vec<Rank> = [&ahead, &behind]
        .iter()
        .enumerate()
        .flat_map(|(p, ids)| ids.iter().rev().take(2).map(move |id| Rank { id: *id, partition: p }))
        .filter(|r| r.id >= id(59, 0))
        .collect();
    assert_eq!(loaded.len(), 2, "the control keeps 2 of the 20 entries above the watermark");
}

#[test]
fn loading_empty_partitions_loads_nothing_and_reads_from_the_start() {
    let (history, merge) = load(&[Vec::new(), Vec::new(), Vec::new()], &[10, 10, 10], 3, 5);
    assert!(history.is_empty());
    assert_eq!(merge.last(2), EntryId::ZERO);
    assert_eq!(merge.watermark(), EntryId::before_time(10));
}
