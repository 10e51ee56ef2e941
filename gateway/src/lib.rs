//! The gateway (work in progress).
