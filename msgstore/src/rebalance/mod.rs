//! Live rebalancing of users over shards when an operator adds or removes
//! one (`imctl rebalance`; design brief section 2, "Rebalance"). The
//! library part, shared by the tool and `imbench rebalance`: the plan and
//! its persisted state ([`plan`]), and the moving of users ([`mover`]).

pub mod mover;
pub mod plan;

pub use mover::{Flow, Moved, Mover, Progress, MOVES_INFLIGHT_DEFAULT, MOVES_INFLIGHT_MAX};
pub use plan::{Phase, Plan, RebalanceError, State};
