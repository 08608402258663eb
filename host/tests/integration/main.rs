//! Integration tests: real nodes in-process on temp dirs, running the real
//! guest components from `guest-examples`.

mod common;
#[path = "../support/pki.rs"]
mod pki;
#[path = "../support/skip.rs"]
mod skip;

mod bridge;
mod bus;
mod cli;
mod cluster;
mod dashboard;
mod durability;
mod egress;
mod esc;
mod hostile;
mod http;
mod isolation;
mod kv;
mod languages;
mod lifecycle;
mod limits;
mod lua;
mod luaworld;
mod mqtt;
mod operator;
mod process;
mod pulley;
mod reload;
mod replication;
mod sdk;
mod trust;
