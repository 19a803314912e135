//! Tollgate: a metering, quota and audit proxy in front of computation services. It knows who
//! called (tokens it issues), what each call cost (points counted from the body), what each
//! user may still spend (quotas), and exactly what went in and came out (captures and audit).
//!
//! Modules by concern: `config` (the file, validated), `model` (the API's vocabulary), `auth`
//! (users, tokens, passwords), `quota` (points, quotas, the ledger), `trace` (tracecodes,
//! processes, redaction), `store` (the embedded store and its writer), `account` (the
//! /account API), `report` (XLSX), `metrics`, `proxy` (the pingora server app: the steps of a
//! call), `demo` (a demo upstream), `server` (wiring), `cli` (commands).

pub mod account;
pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod coding;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod quota;
pub mod report;
pub mod server;
pub mod store;
pub mod trace;
