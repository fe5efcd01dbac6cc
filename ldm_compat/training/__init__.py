"""Training: the DDPM objective, LitEma-exact EMA, and the Accelerate loop."""
