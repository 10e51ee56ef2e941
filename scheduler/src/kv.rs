//! The paged KV cache's block pool (being written).
