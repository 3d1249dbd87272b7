//! Client library (to be written).
