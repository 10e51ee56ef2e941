//! The block pool's invariants, prefix reuse, eviction order and hashing.

use super::*;

fn text(ids: impl IntoIterator<Item = u32>) -> Vec<TokenKey> {
    ids.into_iter().map(TokenKey::Text).collect()
}

/// A distinct hash per `n`, for tests that do not care about content.
fn h(n: u32) -> BlockHash {
    block_hash(None, &[TokenKey::Text(n)])
}

/// Allocates `n` blocks, registering each under `hashes[i]`.
fn sequence(pool: &mut BlockPool, hashes: &[BlockHash]) -> Vec<BlockId> {
    hashes
        .iter()
        .map(|&hash| {
            let id = pool.allocate().expect("room for the sequence");
            pool.register(id, hash);
            id
        })
        .collect()
}

#[test]
fn allocation_until_exhausted_returns_none() {
    let mut pool = BlockPool::new(3, 4);
    let got: Vec<_> = (0..3).map(|_| pool.allocate()).collect();
    assert_eq!(got, [Some(0), Some(1), Some(2)]);
    assert_eq!(pool.available(), 0);
    assert_eq!(pool.allocate(), None);
    let c = pool.counters();
    assert_eq!((c.used_blocks, c.cached_blocks, c.free_blocks), (3, 0, 0));
    pool.check();
}

#[test]
fn release_then_allocate_reuses() {
    let mut pool = BlockPool::new(2, 4);
    let a = pool.allocate().unwrap();
    let _b = pool.allocate().unwrap();
    assert_eq!(pool.allocate(), None);
    pool.release(a);
    assert_eq!(pool.counters().free_blocks, 1);
    assert_eq!(pool.allocate(), Some(a));
    assert_eq!(pool.counters().evictions, 0);
    pool.check();
}

#[test]
fn prefix_is_reused_in_order_and_stops_at_first_miss() {
    let mut pool = BlockPool::new(8, 4);
    let hashes = block_hashes(&text(0..12), 4);
    assert_eq!(hashes.len(), 3);
    let blocks = sequence(&mut pool, &hashes);
    pool.release_all(&blocks);
    assert_eq!(pool.counters().cached_blocks, 3);
    pool.check();

    let got = pool.match_prefix(&hashes);
    assert_eq!(got, blocks);
    let c = pool.counters();
    assert_eq!((c.prefix_hit_blocks, c.prefix_queried_blocks), (3, 3));
    assert_eq!((c.used_blocks, c.cached_blocks), (3, 0));
    pool.check();
    pool.release_all(&got);

    // Same first block, different second: one hit, the third is not reached.
    let mut other = text(0..12);
    other[5] = TokenKey::Text(999);
    let other = block_hashes(&other, 4);
    assert_eq!(other[0], hashes[0]);
    assert_ne!(
        other[2], hashes[2],
        "chaining carries the difference forward"
    );
    let got = pool.match_prefix(&other);
    assert_eq!(got, [blocks[0]]);
    let c = pool.counters();
    assert_eq!((c.prefix_hit_blocks, c.prefix_queried_blocks), (4, 6));
    pool.release_all(&got);

    // A hit after a miss is not part of the prefix.
    let got = pool.match_prefix(&[hashes[0], other[1], hashes[2]]);
    assert_eq!(got, [blocks[0]]);
    assert_eq!(pool.counters().prefix_hit_blocks, 5);
    pool.check();
}

#[test]
fn match_of_a_held_block_shares_it() {
    let mut pool = BlockPool::new(4, 2);
    let held = sequence(&mut pool, &[h(1)]);
    let got = pool.match_prefix(&[h(1)]);
    assert_eq!(got, held);
    assert_eq!(pool.ref_count(held[0]), 2);
    pool.release(held[0]);
    assert_eq!(
        pool.counters().used_blocks,
        1,
        "still held by the second user"
    );
    pool.release(held[0]);
    assert_eq!(pool.counters().cached_blocks, 1);
    pool.check();
}

#[test]
fn eviction_takes_the_least_recently_released_tail_first() {
    let mut pool = BlockPool::new(4, 2);
    let first = sequence(&mut pool, &[h(10), h(11)]);
    let second = sequence(&mut pool, &[h(20), h(21)]);
    pool.release_all(&first);
    pool.release_all(&second);
    assert_eq!(pool.counters().cached_blocks, 4);

    // LRU order: first's tail, first's head, second's tail, second's head.
    let order: Vec<_> = (0..4).map(|_| pool.allocate().unwrap()).collect();
    assert_eq!(order, [first[1], first[0], second[1], second[0]]);
    assert_eq!(pool.counters().evictions, 4);
    pool.check();
}

#[test]
fn evicted_block_no_longer_matches() {
    let mut pool = BlockPool::new(3, 2);
    let seq = sequence(&mut pool, &[h(1), h(2)]);
    pool.release_all(&seq);
    let _fresh = pool.allocate().unwrap(); // the one free block
    let evicted = pool.allocate().unwrap();
    assert_eq!(evicted, seq[1], "the tail goes first");
    assert_eq!(pool.counters().evictions, 1);
    // The head still matches, the evicted tail does not.
    assert_eq!(pool.match_prefix(&[h(1), h(2)]), [seq[0]]);
    pool.release(seq[0]);
    // Even asked for alone, the evicted hash misses.
    assert!(pool.match_prefix(&[h(2)]).is_empty());
    pool.check();
}

#[test]
fn register_keeps_one_hash_per_block_and_one_block_per_hash() {
    let mut pool = BlockPool::new(4, 2);
    let a = pool.allocate().unwrap();
    let b = pool.allocate().unwrap();
    pool.register(a, h(1));
    // Another block with the same content: the existing mapping stays.
    pool.register(b, h(1));
    pool.check();
    assert_eq!(pool.match_prefix(&[h(1)]), [a]);
    pool.release(a);
    // Re-registering replaces the block's hash.
    pool.register(a, h(2));
    pool.check();
    assert!(pool.match_prefix(&[h(1)]).is_empty());
    assert_eq!(pool.match_prefix(&[h(2)]), [a]);
    pool.release(a);
    pool.release_all(&[a, b]);
    let c = pool.counters();
    assert_eq!(
        (c.cached_blocks, c.free_blocks),
        (1, 3),
        "b was never hashed"
    );
    pool.check();
}

#[test]
fn chained_hash_depends_on_earlier_blocks() {
    let a = block_hashes(&text([1, 2, 7, 8]), 2);
    let b = block_hashes(&text([1, 3, 7, 8]), 2);
    assert_ne!(a[0], b[0]);
    assert_ne!(a[1], b[1], "equal tokens, different parents");
    assert_eq!(a[1], block_hash(Some(&a[0]), &text([7, 8])));
    assert_ne!(block_hash(None, &text([7, 8])), a[1]);
}

#[test]
fn partial_block_gets_no_hash() {
    assert_eq!(block_hashes(&text(0..7), 4).len(), 1);
    assert_eq!(block_hashes(&text(0..8), 4).len(), 2);
    assert!(block_hashes(&text(0..3), 4).is_empty());
}

#[test]
fn image_keys_differ_by_image_hash_index_and_kind() {
    let img = |image: u8, index| TokenKey::Image {
        image: [image; 32],
        index,
    };
    let base = block_hash(None, &[img(1, 0), img(1, 1)]);
    assert_ne!(base, block_hash(None, &[img(2, 0), img(2, 1)]));
    assert_ne!(base, block_hash(None, &[img(1, 1), img(1, 0)]));
    assert_ne!(
        block_hash(None, &[TokenKey::Text(0)]),
        block_hash(None, &[img(0, 0)])
    );
    assert_eq!(base, block_hash(None, &[img(1, 0), img(1, 1)]));
}

#[test]
fn disabled_pool_neither_registers_nor_matches() {
    let mut pool = BlockPool::new(4, 2);
    let cached = sequence(&mut pool, &[h(1)]);
    pool.release_all(&cached);
    assert_eq!(pool.counters().cached_blocks, 1);

    pool.set_enabled(false);
    assert_eq!(
        pool.counters().cached_blocks,
        0,
        "disabling forgets the cache"
    );
    let seq = sequence(&mut pool, &[h(2)]);
    pool.release_all(&seq);
    assert_eq!(pool.counters().cached_blocks, 0);
    assert!(pool.match_prefix(&[h(1)]).is_empty());
    assert!(pool.match_prefix(&[h(2)]).is_empty());
    assert_eq!(pool.counters().prefix_queried_blocks, 0);
    pool.check();

    pool.set_enabled(true);
    assert!(
        pool.match_prefix(&[h(2)]).is_empty(),
        "nothing was registered"
    );
    let seq = sequence(&mut pool, &[h(2)]);
    pool.release_all(&seq);
    assert_eq!(pool.match_prefix(&[h(2)]), seq);
    pool.check();
}

#[test]
fn slots_map_positions_across_blocks() {
    let table = BlockTable {
        blocks: vec![5, 2, 9],
        len: 0,
    };
    assert_eq!(table.capacity(4), 12);
    assert_eq!(table.slot(0, 4), 20);
    assert_eq!(table.slot(3, 4), 23);
    assert_eq!(table.slot(4, 4), 8);
    assert_eq!(table.slot(11, 4), 39);
    assert_eq!(table.slots(6, 4), [20, 21, 22, 23, 8, 9]);
    assert_eq!(table.blocks_needed(12, 4), 0);
    assert_eq!(table.blocks_needed(13, 4), 1);
    let pool = BlockPool::new(1, 4);
    assert_eq!(
        (pool.blocks_for(0), pool.blocks_for(4), pool.blocks_for(5)),
        (0, 1, 2)
    );
}

#[test]
#[should_panic(expected = "out of bounds")]
fn slot_past_the_blocks_panics() {
    let table = BlockTable {
        blocks: vec![0],
        len: 0,
    };
    table.slot(4, 4);
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "release of unheld block")]
fn release_of_unheld_block_panics_in_debug() {
    let mut pool = BlockPool::new(2, 2);
    let a = pool.allocate().unwrap();
    pool.release(a);
    pool.release(a);
}

#[test]
fn counters_hold_under_random_operations() {
    // A fixed linear congruential generator, so the run is the same every time.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % n
    };
    let mut pool = BlockPool::new(16, 4);
    let mut seqs: Vec<Vec<BlockId>> = Vec::new();
    let (mut hits, mut evictions) = (0, 0);
    for _ in 0..5000 {
        match next(10) {
            0..=3 => {
                // A prompt over a small vocabulary of prefixes, so some repeat.
                let prefix = next(4) as u32;
                let n = 1 + next(4) as usize;
                let hashes: Vec<_> = (0..n as u32)
                    .scan(None, |parent: &mut Option<BlockHash>, i| {
                        let tok = if i < 2 { prefix } else { 100 + next(3) as u32 };
                        let hash = block_hash(parent.as_ref(), &[TokenKey::Text(tok)]);
                        *parent = Some(hash);
                        Some(hash)
                    })
                    .collect();
                let mut blocks = pool.match_prefix(&hashes);
                for &hash in &hashes[blocks.len()..] {
                    match pool.allocate() {
                        Some(id) => {
                            pool.register(id, hash);
                            blocks.push(id);
                        }
                        None => break,
                    }
                }
                seqs.push(blocks);
            }
            4..=6 if !seqs.is_empty() => {
                let i = next(seqs.len() as u64) as usize;
                let blocks = seqs.swap_remove(i);
                pool.release_all(&blocks);
            }
            7 if !seqs.is_empty() => {
                // Decode growth: one more unhashed block.
                let i = next(seqs.len() as u64) as usize;
                if let Some(id) = pool.allocate() {
                    seqs[i].push(id);
                }
            }
            8 if next(50) == 0 => {
                let on = !pool.enabled();
                pool.set_enabled(on);
            }
            _ => {}
        }
        pool.check();
        let held: usize = seqs
            .iter()
            .flatten()
            .map(|&b| b as usize)
            .collect::<std::collections::HashSet<_>>()
            .len();
        let refs: usize = (0..16).map(|b| pool.ref_count(b) as usize).sum();
        assert_eq!(refs, seqs.iter().map(Vec::len).sum::<usize>());
        let c = pool.counters();
        assert_eq!(c.used_blocks, held);
        assert!(c.prefix_hit_blocks >= hits && c.evictions >= evictions);
        (hits, evictions) = (c.prefix_hit_blocks, c.evictions);
    }
    for blocks in seqs.drain(..) {
        pool.release_all(&blocks);
    }
    pool.check();
    let c = pool.counters();
    assert_eq!(c.used_blocks, 0);
    assert!(c.prefix_hit_blocks > 0 && c.evictions > 0, "{c:?}");
}
