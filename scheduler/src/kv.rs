//! The paged KV cache's block pool (after vLLM's block manager, "Efficient Memory
//! Management for Large Language Model Serving with PagedAttention", Kwon et al. 2023).
//!
//! Each sequence keeps its KV cache in fixed-size blocks of `block_size` token
//! slots, taken from a pool of `num_blocks` blocks. Position `p` of a sequence
//! lives in slot `blocks[p / block_size] * block_size + p % block_size`; the
//! tensor storage only ever sees those slot numbers.
//!
//! A full block can be registered under a content hash chained over every block
//! before it ([`block_hashes`]), so a later prompt with the same prefix reuses
//! the block instead of recomputing it ([`BlockPool::match_prefix`]). A block
//! nobody holds keeps its content (it is *cached*) until the pool needs room,
//! then the least recently released one is evicted first.
//!
//! Every block is in exactly one state:
//! - *used*: reference count > 0 (it may have a hash);
//! - *cached*: reference count 0, has a hash, sits in the LRU;
//! - *free*: reference count 0, no hash, sits in the free list.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// Index of a block in the pool.
pub type BlockId = u32;

/// Content hash of a full block, chained over every block before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub [u8; 32]);

/// What a token position holds, for hashing: a text token id, or the `index`-th
/// token of an image run whose image has content hash `image`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKey {
    /// A text token id.
    Text(u32),
    /// The `index`-th token of the run of an image with content hash `image`.
    Image {
        /// Content hash of the image.
        image: [u8; 32],
        /// Position of the token within the image's run.
        index: u32,
    },
}

/// Domain separation, so these hashes never equal another use of SHA-256 here.
const HASH_DOMAIN: &[u8] = b"tessera.kv.block.v1";

/// The hash of a block holding `tokens` whose preceding block has hash `parent`
/// (`None` for a sequence's first block).
///
/// The encoding is unambiguous: a tag byte for the parent (absent/present) and
/// for each key, fixed-width little-endian numbers, and the token count.
pub fn block_hash(parent: Option<&BlockHash>, tokens: &[TokenKey]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    match parent {
        None => h.update([0u8]),
        Some(p) => {
            h.update([1u8]);
            h.update(p.0);
        }
    }
    h.update((tokens.len() as u64).to_le_bytes());
    for key in tokens {
        match key {
            TokenKey::Text(id) => {
                h.update([0u8]);
                h.update(id.to_le_bytes());
            }
            TokenKey::Image { image, index } => {
                h.update([1u8]);
                h.update(image);
                h.update(index.to_le_bytes());
            }
        }
    }
    BlockHash(h.finalize().into())
}

/// Hashes of every full block of `tokens`, each chained over the ones before it.
/// A trailing partial block gets no hash.
pub fn block_hashes(tokens: &[TokenKey], block_size: usize) -> Vec<BlockHash> {
    assert!(block_size > 0, "block_size must be positive");
    let mut hashes: Vec<BlockHash> = Vec::with_capacity(tokens.len() / block_size);
    for chunk in tokens.chunks_exact(block_size) {
        let next = block_hash(hashes.last(), chunk);
        hashes.push(next);
    }
    hashes
}

/// A snapshot of the pool's occupancy and totals.
///
/// `used_blocks + cached_blocks + free_blocks == total_blocks` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounters {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks with reference count > 0.
    pub used_blocks: usize,
    /// Blocks with reference count 0 whose content is kept for reuse (evictable).
    pub cached_blocks: usize,
    /// Blocks with reference count 0 and no content.
    pub free_blocks: usize,
    /// Cached blocks taken for new content.
    pub evictions: u64,
    /// Blocks handed out by [`BlockPool::match_prefix`].
    pub prefix_hit_blocks: u64,
    /// Blocks asked about by [`BlockPool::match_prefix`] (while reuse is enabled).
    pub prefix_queried_blocks: u64,
}

/// One block's bookkeeping.
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    refs: u32,
    hash: Option<BlockHash>,
    /// Key in the LRU while the block is cached.
    lru_tick: Option<u64>,
}

/// The pool of KV blocks: allocation, reference counts, prefix reuse and LRU
/// eviction of cached blocks.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks; the next to hand out is at the end.
    free: Vec<BlockId>,
    /// Cached blocks by release tick: the first entry is the least recently used.
    lru: BTreeMap<u64, BlockId>,
    next_tick: u64,
    by_hash: HashMap<BlockHash, BlockId>,
    used: usize,
    enabled: bool,
    evictions: u64,
    prefix_hit_blocks: u64,
    prefix_queried_blocks: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` empty blocks of `block_size` slots, prefix reuse on.
    ///
    /// Panics if `block_size` is 0 or the slots do not fit in `u32`.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        let slots = num_blocks.checked_mul(block_size);
        assert!(
            slots.is_some_and(|s| s <= u32::MAX as usize + 1),
            "{num_blocks} blocks of {block_size} slots do not fit in u32 slot numbers"
        );
        // Reversed, so blocks are handed out 0, 1, 2, … at first.
        let free = (0..num_blocks as BlockId).rev().collect();
        Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free,
            lru: BTreeMap::new(),
            next_tick: 0,
            by_hash: HashMap::new(),
            used: 0,
            enabled: true,
            evictions: 0,
            prefix_hit_blocks: 0,
            prefix_queried_blocks: 0,
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be allocated now: free + cached (evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Whether prefix reuse is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Reference count of `block` (0 when cached or free).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block as usize].refs
    }

    /// Takes a block (reference count 1): the free list first, else evicts the
    /// least recently used cached block (forgetting its hash). `None` when
    /// nothing is available.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.lru.pop_first()?;
                let block = &mut self.blocks[id as usize];
                block.lru_tick = None;
                if let Some(hash) = block.hash.take() {
                    self.by_hash.remove(&hash);
                }
                self.evictions += 1;
                id
            }
        };
        let block = &mut self.blocks[id as usize];
        debug_assert_eq!(block.refs, 0, "allocated block {id} was held");
        debug_assert!(block.hash.is_none() && block.lru_tick.is_none());
        block.refs = 1;
        self.used += 1;
        Some(id)
    }

    /// Longest prefix of `hashes` found in the cache, in order, stopping at the
    /// first miss; each returned block gets one more reference (a cached one
    /// leaves the LRU). Counts queried and hit blocks. Empty while reuse is off.
    ///
    /// The caller decides how much of a prompt to look up (typically every full
    /// block but the one holding the last prompt token, whose logits are needed).
    pub fn match_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        if !self.enabled {
            return Vec::new();
        }
        self.prefix_queried_blocks += hashes.len() as u64;
        let mut found = Vec::new();
        for hash in hashes {
            let Some(&id) = self.by_hash.get(hash) else {
                break;
            };
            self.retain(id);
            found.push(id);
        }
        self.prefix_hit_blocks += found.len() as u64;
        found
    }

    /// Records that `block` (held, full) has content `hash`, so later prompts can
    /// reuse it. If another block already has `hash`, that mapping is kept and
    /// `block` stays without a hash. A block registered before under a different
    /// hash loses the old one: a block has at most one hash, a hash at most one
    /// block. Does nothing while reuse is off.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) {
        debug_assert!(
            self.blocks[block as usize].refs > 0,
            "register of unheld block {block}"
        );
        if !self.enabled {
            return;
        }
        let old = self.blocks[block as usize].hash;
        if old == Some(hash) {
            return;
        }
        if let Some(old) = old {
            self.by_hash.remove(&old);
            self.blocks[block as usize].hash = None;
        }
        if self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.blocks[block as usize].hash = Some(hash);
    }

    /// Drops one reference to `block`. At zero, a block with a registered hash
    /// becomes cached (most recently used end of the LRU), any other becomes free.
    pub fn release(&mut self, block: BlockId) {
        let b = &mut self.blocks[block as usize];
        debug_assert!(b.refs > 0, "release of unheld block {block}");
        if b.refs == 0 {
            return;
        }
        b.refs -= 1;
        if b.refs > 0 {
            return;
        }
        self.used -= 1;
        if b.hash.is_some() {
            let tick = self.next_tick;
            self.next_tick += 1;
            b.lru_tick = Some(tick);
            self.lru.insert(tick, block);
        } else {
            self.free.push(block);
        }
    }

    /// Releases every block of a sequence, the tail first, so that its tail is
    /// evicted before its head (a prefix's head is what later prompts share).
    pub fn release_all(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            self.release(block);
        }
    }

    /// Occupancy and totals now.
    pub fn counters(&self) -> PoolCounters {
        PoolCounters {
            total_blocks: self.blocks.len(),
            used_blocks: self.used,
            cached_blocks: self.lru.len(),
            free_blocks: self.free.len(),
            evictions: self.evictions,
            prefix_hit_blocks: self.prefix_hit_blocks,
            prefix_queried_blocks: self.prefix_queried_blocks,
        }
    }

    /// Turns prefix reuse on or off. Off: [`register`](Self::register) does
    /// nothing, [`match_prefix`](Self::match_prefix) returns empty, and every
    /// hash is forgotten now (cached blocks become free).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if enabled {
            return;
        }
        self.by_hash.clear();
        for block in &mut self.blocks {
            block.hash = None;
        }
        while let Some((_, id)) = self.lru.pop_first() {
            self.blocks[id as usize].lru_tick = None;
            self.free.push(id);
        }
    }

    /// Adds one reference to a block found by hash, taking it out of the LRU if
    /// it was cached.
    fn retain(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if block.refs == 0 {
            let tick = block
                .lru_tick
                .take()
                .expect("unheld hashed block is in the LRU");
            self.lru.remove(&tick);
            self.used += 1;
        }
        block.refs += 1;
    }

    /// Checks every invariant against a recount of the blocks' states.
    #[cfg(test)]
    fn check(&self) {
        let mut in_free = vec![false; self.blocks.len()];
        for &id in &self.free {
            assert!(!in_free[id as usize], "block {id} twice in the free list");
            in_free[id as usize] = true;
        }
        let mut in_lru = vec![false; self.blocks.len()];
        for (&tick, &id) in &self.lru {
            assert!(!in_lru[id as usize], "block {id} twice in the LRU");
            in_lru[id as usize] = true;
            assert_eq!(self.blocks[id as usize].lru_tick, Some(tick));
        }
        let mut used = 0;
        for (i, b) in self.blocks.iter().enumerate() {
            assert!(!(in_free[i] && in_lru[i]), "block {i} both free and cached");
            if b.refs > 0 {
                used += 1;
                assert!(
                    !in_free[i] && !in_lru[i],
                    "held block {i} is free or cached"
                );
                assert!(b.lru_tick.is_none());
            } else {
                assert!(in_free[i] || in_lru[i], "block {i} is lost");
                assert_eq!(in_lru[i], b.hash.is_some(), "block {i}: cached iff hashed");
            }
            if let Some(hash) = b.hash {
                assert_eq!(self.by_hash.get(&hash), Some(&(i as BlockId)));
            }
        }
        for (hash, &id) in &self.by_hash {
            assert_eq!(self.blocks[id as usize].hash, Some(*hash));
        }
        let c = self.counters();
        assert_eq!(c.used_blocks, used);
        assert_eq!(
            c.used_blocks + c.cached_blocks + c.free_blocks,
            c.total_blocks
        );
        assert_eq!(self.available(), c.cached_blocks + c.free_blocks);
    }
}

/// A sequence's blocks and how many of its positions are filled.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    /// The sequence's blocks, in position order.
    pub blocks: Vec<BlockId>,
    /// Positions `0..len` hold KV entries.
    pub len: usize,
}

impl BlockTable {
    /// Slot of position `pos`. Panics if its block is not allocated (a bug).
    pub fn slot(&self, pos: usize, block_size: usize) -> u32 {
        let block = self.blocks[pos / block_size] as usize;
        let slot = block * block_size + pos % block_size;
        u32::try_from(slot).expect("slot numbers fit in u32 (checked by BlockPool::new)")
    }

    /// Slots of positions `0..len`.
    pub fn slots(&self, len: usize, block_size: usize) -> Vec<u32> {
        (0..len).map(|pos| self.slot(pos, block_size)).collect()
    }

    /// Positions the blocks can hold.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// More blocks needed to hold `len` positions (0 when they already fit).
    pub fn blocks_needed(&self, len: usize, block_size: usize) -> usize {
        len.div_ceil(block_size).saturating_sub(self.blocks.len())
    }
}

#[cfg(test)]
mod tests;
