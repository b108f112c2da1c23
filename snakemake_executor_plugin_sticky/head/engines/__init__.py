"""Where the workers live: embedded in this process (`local`), batch jobs (`jobqueue`,
`batch_systems`), or a scheduler started elsewhere (`attach`). `base` is the engine they share;
its scheduler plugin runs inside the Dask scheduler, which is a thread of this process except in
attach mode."""
