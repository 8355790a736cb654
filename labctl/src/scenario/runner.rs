//! Plays a scenario (stub).
