//! Self-supervised objectives: SimMIM, AvgDist.
