"""Data: what a dataset is (classes, speakers, sizes, class weights, label maps; datasets.py), reading a data file
into checked dialogues (dialogues.py, with every check in datacheck.py and the open .npz format in openformat.py),
converting between the formats (convert.py) and generated stand-ins in the real layouts (synthetic.py)."""
