//! Wire-level fakes of the providers, one file each: in-process servers that
//! check what the real service checks (auth, signatures, body shape, limits)
//! and answer as it does, errors included. `http` is their shared plumbing.

pub mod ably;
pub mod brevo;
pub mod http;
pub mod pubnub;
pub mod pusher;
pub mod twilio;
pub mod webhook;
