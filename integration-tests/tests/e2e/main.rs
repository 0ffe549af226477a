//! End-to-end suites against the real stack, compiled into one test binary.

mod adversarial;
mod auth;
mod crash;
mod dead_letters;
mod degraded;
mod dlq_cli;
mod faults;
mod foreign_producers;
mod hostile_http;
mod hot_views;
mod jwt;
mod keys;
mod limits;
mod memory_path;
mod memory_pipeline;
mod observability;
mod orchestrator;
mod poison;
mod prometheus;
mod replay;
mod replay_tasks;
mod routes;
mod sasl;
mod search_plans;
mod stall;
mod task_views;
