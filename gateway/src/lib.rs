//! The login gateway (issue 6): the only process clients reach. Built up
//! piece by piece; today it holds the resume tokens the cluster's gateways
//! check by themselves.

pub mod resume;
