"""Training: the loop (`trainer`), the resume policy (`resume`), what a run logs (`writers`), data parallelism
over devices (`devices`), transfer learning (`transfer`), the optimizer (`optim`) and multi-host set-up
(`distributed`)."""
