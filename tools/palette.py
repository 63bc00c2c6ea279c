"""One colour and one short name per method, for every figure: the notebook's (tools/tutorial.py),
results.png (tools/reproduce_report.py), variants.png (tools/variants.py), followup.png (tools/followup.py). A method
keeps its colour from one figure to the next; tests/test_palette.py checks that the notebook's figures, results.png and
followup.png draw with these.
And a figure stored in few colours: png()."""
import io

from PIL import Image

PALETTE = {
    'teacher': 'tab:brown',
    'untrained': 'lightgray',     # a ViT with random weights, before any training
    'scratch': 'tab:gray',
    'finetune': 'tab:orange',
    'copy': 'tab:green',
    'distill': 'tab:blue',
    'ensemble': 'tab:purple',
}

# a method's name in a legend or a panel's title
SHORT = {'scratch': 'scratch', 'finetune': 'fine-tune', 'copy': 'copy', 'distill': 'distillation',
         'ensemble': 'ensemble'}
# the names the figures give the methods, each to its key above
ALIASES = {'fine-tune': 'finetune', 'attention copy': 'copy', 'attention distillation': 'distill',
           'distillation': 'distill'}


def colour(name):
    """The colour of a method, by its key ('distill') or a name a figure gives it ('attention distillation'); for
    any other name a KeyError, so that no figure of these methods invents a colour."""
    return PALETTE[ALIASES.get(name, name)]


def png(fig, **savefig):
    """A matplotlib figure as PNG bytes in at most 256 colours (PIL's median cut): about a third of the bytes of
    matplotlib's full-colour PNG, and the same to the eye, for figures the repository or the notebook stores."""
    full = io.BytesIO()
    fig.savefig(full, format='png', facecolor='white', **savefig)
    small = io.BytesIO()
    quantized = Image.open(full).convert('RGB').quantize(256, Image.Quantize.MEDIANCUT)
    quantized.save(small, 'PNG', optimize=True)
    return small.getvalue()
