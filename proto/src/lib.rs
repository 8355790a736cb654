//! Generated gRPC types for `lab.v1` plus the encoded file descriptor set that
//! service B serves through gRPC server reflection.

#![allow(clippy::doc_markdown)]

/// `lab.v1`: the Backend service and its messages.
pub mod v1 {
    tonic::include_proto!("lab.v1");

    /// Encoded `FileDescriptorSet` of `lab/v1/backend.proto`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lab_v1_descriptor");
}

/// The gRPC status code as grpc-go spells it (`OK`, `NotFound`,
/// `DeadlineExceeded`, …): the value of every `code` metric label in the lab.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Metadata key on every B reply, success or error, naming the B instance:
/// lets A attribute even failed calls to a backend.
pub const SERVED_BY_METADATA: &str = "x-served-by";
