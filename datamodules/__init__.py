"""LightningDataModules: CIFAR (+ZCA), swiss roll, user points, and the readers behind them."""
