"""Training: the loop (`trainer`), transfer learning (`transfer`), the optimizer (`optim`) and multi-host
set-up (`distributed`)."""
