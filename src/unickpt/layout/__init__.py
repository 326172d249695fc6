"""Global boxes: where each rank's shard of a tensor sits in the tensor's global index space."""
