"""Data sets, one module per family: `data.vision` (image classification sets), `data.tabular`
(UCI files in their original formats and the scikit-learn tabular sets) and `data.synthetic` (small
generated sets such as the 2-D spiral). Import the module you need directly (`from data import tabular`);
this package imports nothing eagerly, so loading one family never pulls in another's dependencies.
Missing files raise `engine.UserError` naming the file to put where, never a download at run time."""
