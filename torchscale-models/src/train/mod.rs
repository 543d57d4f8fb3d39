//! Training pieces (being written).
