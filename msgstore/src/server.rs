//! TCP server (to be written).
