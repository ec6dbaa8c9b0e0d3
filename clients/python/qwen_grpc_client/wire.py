"""Names on the wire that the server and its clients share. They are defined
here, once: the server imports them from the client package."""

# Response header (initial metadata) naming the replica that served a call.
REPLICA_METADATA_KEY = "qwen-replica"

# Request header carrying a conversation's session key; an affinity channel
# hashes it (gRPC ring_hash, requestHashHeader) to pick the replica.
SESSION_METADATA_KEY = "qwen-session-id"
