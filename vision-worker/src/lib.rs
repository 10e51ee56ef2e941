//! The vision-worker (work in progress).
