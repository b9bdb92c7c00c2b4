//! `dittoctl`'s library half: reaching the daemon ([`connect`]) and showing its answers to
//! people and to scripts ([`output`]).

pub mod connect;
pub mod output;
