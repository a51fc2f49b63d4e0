//! Block making: the ingress pool and, for a one-node subnet, the block maker that finalizes blocks of ingress at increasing heights.
