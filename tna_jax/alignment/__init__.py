"""Linear mode connectivity and post-hoc alignment: interpolation curves and barriers (one
compiled call per curve), permutation specs of every model, weight and activation matching
(one compiled search), and REPAIR."""
